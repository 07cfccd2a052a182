"""``latflow report``: an offline HTML page with the analysis table, the warnings and the plots of ensembles.

The page (``DIR/index.html``) has one section per ensemble and links its figures (PNG files in
``DIR``) by relative paths; it loads nothing from the network (no scripts at all, inline CSS, system
fonts), so the folder can be copied anywhere and opened from disk.
"""

from __future__ import annotations

import html
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plots
from .report import format_table, format_value_error

__all__ = ["ReportError", "find_model", "write_report"]

#: datasets whose name contains one of these and which are ``(n, T)`` are drawn as correlators
CORRELATOR_WORDS = ("corr",)
#: observables drawn as topological sectors (integer bars)
CHARGE_NAMES = ("topological_charge",)
PNG_DPI = 90


class ReportError(ValueError):
    """A report that cannot be written (bad input); the message is one line naming the file."""


@dataclass
class _Figure:
    """One figure of a section: the PNG's file name (relative to the report folder) and its caption."""

    file: str
    caption: str


@dataclass
class _Section:
    """What a section shows besides the analysis: figures by group, and notes about what was skipped."""

    groups: dict[str, list[_Figure]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ReportError(f"{out_dir}: directory exists and is not empty (use --force to write into it)")


def _check_ensemble(path: Path) -> None:
    """Refuse (one line) a missing, non-HDF5 or damaged ensemble."""
    from latflow.ensemble import EnsembleError, require_hdf5_file, verify

    try:
        require_hdf5_file(path)
        problems = verify(path)
    except EnsembleError as exc:
        raise ReportError(" ".join(str(exc).split())) from None
    except (OSError, RuntimeError, KeyError) as exc:
        raise ReportError(f"{path}: damaged HDF5 file: cannot read: {type(exc).__name__}") from None
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ReportError(f"{path}: damaged ensemble: {problems[0]}{more}; 'latflow verify' lists every problem")


def _override_value(record: str, key: str) -> str | None:
    """The last ``--set key=value`` recorded in a job record's override comments (value as TOML or text)."""
    found = None
    for line in record.splitlines():
        m = re.match(rf"#\s+--set\s+{re.escape(key)}\s*=(.*)$", line)
        if m:
            text = m.group(1).strip()
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text
            found = str(value)
    return found


def find_model(ensemble: Path, record: str) -> Path | None:
    """The flow checkpoint of the job that wrote an ensemble, from the job record in the file.

    ``output.model`` of the record (``--set`` changes included) is tried as given and relative to
    the ensemble's folder; without it, the job's default ``<ensemble stem>.model.pt`` beside the
    ensemble.

    Parameters
    ----------
    ensemble : Path
        The ensemble file.
    record : str
        Its root attribute ``job`` (the job file's text and the command-line changes).

    Returns
    -------
    Path or None
        An existing file, or None.
    """
    try:
        job = tomllib.loads(record)
    except tomllib.TOMLDecodeError:
        job = {}
    output = job.get("output", {}) if isinstance(job.get("output"), dict) else {}
    model = _override_value(record, "output.model") or str(output.get("model", "") or "")
    if model:
        candidates = [Path(model), ensemble.parent / Path(model).name]
        if not Path(model).is_absolute():
            candidates.insert(1, ensemble.parent / model)
    else:
        candidates = [ensemble.with_name(ensemble.stem + ".model.pt")]
    return next((p for p in candidates if p.is_file()), None)


def _load_history(model: Path) -> dict:
    """The ``history`` of a training checkpoint (refused in one line if unreadable)."""
    from latflow.checkpoint import load

    try:
        state = load(model)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a bad file; one line for all
        raise ReportError(f"{model}: not a readable training checkpoint ({type(exc).__name__})") from None
    history = state.get("history") if isinstance(state, dict) else None
    if not isinstance(history, dict):
        raise ReportError(f"{model}: checkpoint has no training 'history'")
    return {k: list(v) for k, v in history.items() if isinstance(v, (list, tuple))}


class _Writer:
    """Renders figures of one section into the report folder."""

    def __init__(self, out_dir: Path, prefix: str, formats: Sequence[str], only: Sequence[str] | None = None) -> None:
        self.out_dir, self.prefix, self.formats = out_dir, prefix, tuple(formats)
        self.only = None if only is None else set(only)
        self.section = _Section()

    def wants(self, dataset: str) -> bool:
        """Whether the figures of ``observables/<dataset>`` are asked for."""
        return self.only is None or dataset in self.only

    def add(self, group: str, stem: str, caption: str, make: Callable[[], object]) -> None:
        """Make a figure with ``make()`` and save it; a ValueError becomes a note instead."""
        try:
            fig = make()
        except ValueError as exc:
            self.section.notes.append(f"{caption}: not plotted ({' '.join(str(exc).split())})")
            return
        name = f"{self.prefix}_{_slug(stem)}"
        plots.save_figure(fig, self.out_dir / f"{name}.png", formats=("png", *self.formats), dpi=PNG_DPI)
        self.section.groups.setdefault(group, []).append(_Figure(f"{name}.png", caption))


def _chains(reader, n: int) -> list[np.ndarray]:
    """Row indices ``(n_c,)`` of each chain in Markov order."""
    chain = reader.read("markov/chain").reshape(-1) if reader.has("markov/chain") else np.zeros(n, int)
    step = reader.read("markov/step").reshape(-1) if reader.has("markov/step") else None
    out = []
    for c in np.unique(chain):
        idx = np.flatnonzero(chain == c)
        out.append(idx[np.argsort(step[idx], kind="stable")] if step is not None else idx)
    return out


def _is_correlator(name: str, values: np.ndarray) -> bool:
    return values.ndim == 2 and values.shape[1] >= 2 and any(w in name.lower() for w in CORRELATOR_WORDS)


def _markov_figures(w: _Writer, reader, result: Mapping) -> None:
    """Histories, histograms, autocorrelation and tau_int of each observable; correlators; weights."""
    n = int(reader.n_committed)
    chains = _chains(reader, n)
    step = reader.read("markov/step").reshape(-1) if reader.has("markov/step") else None
    for ds in filter(w.wants, reader.names("observables")):
        values = np.asarray(reader.read(f"observables/{ds}"), dtype=np.float64)
        if _is_correlator(ds, values):
            w.add(
                "Correlators",
                f"{ds}_correlator",
                f"{ds}: correlator and effective mass",
                lambda v=values, d=ds: plots.plot_correlator(plots.correlator_estimate([v[i] for i in chains]), d),
            )
            continue
        if values.ndim != 1:
            w.section.notes.append(f"{ds}: dataset of shape {values.shape[1:]} per row, not plotted")
            continue
        reps = [values[i] for i in chains]
        steps = None if step is None else [step[i] for i in chains]
        w.add(
            "Monte Carlo histories",
            f"{ds}_history",
            f"{ds}: history",
            lambda r=reps, d=ds, s=steps: plots.plot_history(r, d, steps=s),
        )
        if ds in CHARGE_NAMES:
            w.add("Histograms", f"{ds}_sectors", f"{ds}: sectors", lambda v=values: plots.plot_charge_histogram(v))
        else:
            w.add(
                "Histograms", f"{ds}_histogram", f"{ds}: histogram", lambda v=values, d=ds: plots.plot_histogram(v, d)
            )
        try:
            acf = plots.autocorrelation(reps)
        except ValueError as exc:
            w.section.notes.append(f"{ds}: autocorrelation not plotted ({exc})")
            continue
        w.add(
            "Autocorrelation",
            f"{ds}_rho",
            f"{ds}: autocorrelation function",
            lambda a=acf, d=ds: plots.plot_autocorrelation(a, d),
        )
        w.add("Autocorrelation", f"{ds}_tau_int", f"{ds}: tau_int(W)", lambda a=acf, d=ds: plots.plot_tau_int(a, d))
    if reader.has("weights/proposal_log_w") and n:
        lw = np.asarray(reader.read("weights/proposal_log_w"), dtype=np.float64)
        w.add(
            "Weights",
            "proposal_log_w",
            "flow proposals: log w = log p - log q",
            lambda: plots.plot_weights(lw, "log w (proposals)", ess=result.get("ess")),
        )


def _weighted_figures(w: _Writer, reader) -> None:
    """Weighted ensembles: weighted histograms of the observables and the weights with each run's ESS."""
    from scipy.special import logsumexp

    runs = reader.runs()
    n_particles = np.asarray(runs.get("annealing/n_particles", []), dtype=np.int64)
    log_z = np.asarray(runs.get("annealing/log_z", []), dtype=np.float64)
    lw = np.asarray(reader.read("weights/log_w"), dtype=np.float64).reshape(-1)
    ends = np.cumsum(n_particles)
    n = int(ends[-1]) if ends.size else 0
    lw = lw[:n]
    # row weights of the combined estimate: Z_r softmax(log_w of run r)
    within = np.empty_like(lw)
    total = np.empty_like(lw)
    for r, (a, b) in enumerate(zip(np.concatenate(([0], ends[:-1])), ends, strict=True)):
        within[a:b] = lw[a:b] - logsumexp(lw[a:b])
        total[a:b] = within[a:b] + log_z[r]
    weights = np.exp(total - total.max()) if n else total
    for ds in filter(w.wants, reader.names("observables")):
        values = np.asarray(reader.read(f"observables/{ds}"), dtype=np.float64)[:n]
        if values.ndim != 1:
            w.section.notes.append(f"{ds}: dataset of shape {values.shape[1:]} per row, not plotted")
            continue
        w.add(
            "Histograms",
            f"{ds}_histogram",
            f"{ds}: weighted histogram",
            lambda v=values, d=ds: plots.plot_histogram(v, d, weights=weights),
        )
    run_ess = runs.get("annealing/ess")
    w.add(
        "Weights",
        "log_w",
        "log w within each run, and each run's ESS",
        lambda: plots.plot_weights(within, "log w (within run)", run_ess=run_ess),
    )


def _training_figure(w: _Writer, model: Path) -> None:
    try:
        history = _load_history(model)
    except ReportError as exc:  # a model found from the job record, not asked for: a note, not a refusal
        w.section.notes.append(f"training curves: {exc}")
        return
    w.add(
        "Training",
        "training",
        f"training curves ({model.name})",
        lambda: plots.plot_training(history, title=f"Training: {model.name}"),
    )


# ---- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #aaa; margin-top: 2em; } h3 { margin-top: 1.4em; }
table.obs { border-collapse: collapse; font-size: 0.9em; }
table.obs th, table.obs td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
table.obs td:first-child, table.obs th:first-child,
table.obs td:last-child, table.obs th:last-child { text-align: left; }
dl.meta dt { font-weight: bold; float: left; clear: left; width: 11em; } dl.meta dd { margin-left: 12em; }
ul.warnings li { color: #8a1c00; }
.figs { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; flex: 0 1 32%; min-width: 380px; } figcaption { font-size: 0.8em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _num(x: object, fmt: str = ".6g") -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _table(result: Mapping) -> str:
    """HTML table of the observables and derived observables of an analysis result."""
    weighted = bool(result.get("weighted"))
    extra = ["method", "runs", "n", "z"] if weighted else ["tau_int", "tau_int err", "W", "n"]
    head = ["observable", "mean", "error", "value(error)", *extra, "warnings"]
    overall = set(result.get("warnings", []))
    rows = []
    for kind in ("observables", "derived"):
        for name, r in result.get(kind, {}).items():
            own = [x for x in r.get("warnings", []) if x not in overall]
            cells = [name, _num(r["mean"], ".8g"), _num(r["err"], ".3g"), format_value_error(r["mean"], r["err"])]
            if weighted:
                cells += [r.get("method", ""), _num(r.get("n_runs")), _num(r.get("n")), _num(r.get("z"), "+.2f")]
            else:
                window = f"{r.get('window', '')}{' (capped)' if r.get('window_capped') else ''}"
                cells += [_num(r["tau_int"], ".3f"), _num(r["tau_int_err"], ".3f"), window, _num(r["n"])]
            cells.append("; ".join(own))
            rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return "<p>No observables.</p>"
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f'<table class="obs">\n{header}\n' + "\n".join(rows) + "\n</table>"


def _meta(path: Path, result: Mapping, sampler: Mapping, model: Path | None, model_note: str) -> str:
    couplings = ", ".join(f"{k} = {v}" for k, v in result.get("couplings", {}).items())
    items = [
        ("file", str(path)),
        ("theory", result.get("theory", "?")),
        ("couplings", couplings or "-"),
        ("lattice", "x".join(str(x) for x in result.get("lattice_shape", []))),
        ("sampler", sampler.get("kind", "?")),
        ("rows", result.get("n_committed", 0)),
        ("complete", "yes" if result.get("complete", True) else "NO (interrupted run)"),
        ("checksums", result.get("checksums", "-")),
    ]
    if "n_chains" in result:
        items.append(("chains", result["n_chains"]))
    if "acceptance" in result:
        items.append(("acceptance", format_value_error(result["acceptance"]["mean"], result["acceptance"]["err"])))
    if result.get("ess") is not None:
        items.append(("ESS fraction", f"{result['ess']:.4g}"))
    items.append(("model", str(model) if model else model_note))
    return '<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _section_html(i: int, path: Path, result: Mapping, sampler: Mapping, sec: _Section, model, model_note) -> str:
    parts = [f'<section id="ensemble-{i}">', f"<h2>{i + 1}. {_e(path.name)}</h2>"]
    parts.append(_meta(path, result, sampler, model, model_note))
    parts.append("<h3>Analysis</h3>")
    parts.append(_table(result))
    warnings = list(result.get("warnings", []))
    if warnings:
        parts.append("<h3>Warnings</h3>")
        parts.append('<ul class="warnings">' + "".join(f"<li>{_e(x)}</li>" for x in warnings) + "</ul>")
    else:
        parts.append("<p>No ensemble-wide warnings.</p>")
    parts.append(
        "<details><summary>Plain-text table (as printed by latflow analyze)</summary>"
        f"<pre>{_e(format_table(dict(result)))}</pre></details>"
    )
    for group, figs in sec.groups.items():
        parts.append(f"<h3>{_e(group)}</h3>")
        cells = [
            f'<figure><img src="{_e(f.file)}" alt="{_e(f.caption)}"><figcaption>{_e(f.caption)}</figcaption></figure>'
            for f in figs
        ]
        parts.append('<div class="figs">' + "".join(cells) + "</div>")
    if sec.notes:
        parts.append("<h3>Not plotted</h3><ul>" + "".join(f"<li>{_e(x)}</li>" for x in sec.notes) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _page(sections: list[str], paths: list[Path]) -> str:
    toc = "".join(f'<li><a href="#ensemble-{i}">{_e(p.name)}</a></li>' for i, p in enumerate(paths))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon request
        "<title>latflow report</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>latflow report</h1>\n<ul>{toc}</ul>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_observables(paths: list[Path], observables: Sequence[str] | None) -> None:
    """Refuse (one line) an observable name that none of the ensembles holds."""
    from latflow.ensemble import EnsembleReader

    if observables is None:
        return
    present: set[str] = set()
    for p in paths:
        with EnsembleReader(p) as r:
            present.update(r.names("observables"))
    unknown = [o for o in observables if o not in present]
    if unknown:
        raise ReportError(
            f"{paths[0] if len(paths) == 1 else 'the ensembles'}: --observable {unknown[0]!r}: no such "
            f"observables/ dataset; allowed: {', '.join(sorted(present)) or 'none'}"
        )


def _models_for(ensembles: list[Path], models: Sequence[str | Path]) -> list[Path | None]:
    """``--model`` files matched to ensembles: one for all, or one each in order (each checked readable)."""
    given = [Path(m) for m in models]
    for m in given:
        if not m.is_file():
            raise ReportError(f"{m}: --model: no such file")
        _load_history(m)
    if not given:
        return [None] * len(ensembles)
    if len(given) == 1:
        return given * len(ensembles)
    if len(given) != len(ensembles):
        raise ReportError(
            f"--model given {len(given)} times for {len(ensembles)} ensembles: give it once (for every "
            "ensemble) or once per ensemble, in the same order"
        )
    return given


def _ensemble_section(
    i: int,
    path: Path,
    model: Path | None,
    out: Path,
    analyze: Callable[[Path], dict],
    pdf: bool,
    only: Sequence[str] | None,
) -> str:
    """Analyse ensemble number ``i`` (from 0), write its figures into ``out``; returns its HTML section."""
    from latflow.ensemble import EnsembleReader

    result = analyze(path)
    writer = _Writer(out, f"e{i + 1}", ("pdf",) if pdf else (), only)
    with EnsembleReader(path) as reader:
        sampler = dict(reader.sampler) if isinstance(reader.sampler, dict) else {}
        note = "none given"
        if model is None:
            model = find_model(path, str(reader.attrs.get("job", "")))
            note = "none found from the job record" if reader.attrs.get("model_sha256") else "none (no flow)"
        if reader.is_weighted:
            _weighted_figures(writer, reader)
        else:
            _markov_figures(writer, reader, result)
    if model is not None:
        _training_figure(writer, model)
    return _section_html(i, path, result, sampler, writer.section, model, note)


def write_report(
    ensembles: Sequence[str | Path],
    out_dir: str | Path,
    *,
    models: Sequence[str | Path] = (),
    force: bool = False,
    analyze: Callable[[Path], dict] | None = None,
    pdf: bool = False,
    observables: Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` with one section per ensemble and its figures as PNG files beside it.

    Every input is checked before anything is written: a missing, non-HDF5 or damaged ensemble
    (checksums that do not verify), a missing ``--model`` file and an ``out_dir`` that exists and is
    not empty (unless ``force``) are refused with a one-line :class:`ReportError`.

    Parameters
    ----------
    ensembles : sequence of path-like
        Ensemble files (ENSEMBLE_FORMAT.md).
    out_dir : path-like
        Report folder (created).
    models : sequence of path-like, optional
        Training checkpoints whose ``history`` is plotted: one for every ensemble, or one per
        ensemble in order. Default: each ensemble's own model, found from its job record
        (:func:`find_model`), where there is one.
    force : bool, optional
        Write into an existing non-empty folder (files of the same names are replaced).
    analyze : callable, optional
        ``analyze(path) -> dict`` like :func:`~latflow.analysis.analyze_ensemble` (the CLI passes the
        theory-aware analysis with exact means and derived observables); default ``analyze_ensemble``.
    pdf : bool, optional
        Also write each figure as PDF beside its PNG.
    observables : sequence of str, optional
        Draw the figures of these ``observables/<name>`` datasets only (default: all); each must be in
        at least one of the ensembles. The analysis tables always list every observable.

    Returns
    -------
    Path
        ``out_dir/index.html``.
    """
    from .report import analyze_ensemble

    paths = [Path(p) for p in ensembles]
    if not paths:
        raise ReportError("no ensemble given")
    for p in paths:
        _check_ensemble(p)
    chosen = _models_for(paths, models)
    _check_observables(paths, observables)
    out = Path(out_dir)
    _check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    analyze = analyze or analyze_ensemble
    sections = []
    for i, (path, model) in enumerate(zip(paths, chosen, strict=True)):
        try:
            sections.append(_ensemble_section(i, path, model, out, analyze, pdf, observables))
        except (OSError, RuntimeError, KeyError) as exc:  # h5py on a file damaged past what verify checks
            raise ReportError(f"{path}: damaged HDF5 file: cannot read: {type(exc).__name__}: {exc}") from None
    index = out / "index.html"
    _write_text_atomic(index, _page(sections, paths))
    return index
