"""What ``latflow analyze`` adds to :func:`latflow.analysis.multi.analyze_ensembles`: the theory's pieces.

* derived observables: the theory's own, built-in ones from stored inputs (:func:`builtin_derived`),
  effective masses of stored correlators, and user functions from ``--derived FILE.py``;
* reweighting factors (``--reweight``): the stored ``weights/log_w``, the action difference to nearby
  couplings computed by the theory on every stored configuration, or ``LOG_WEIGHT`` of a user file.

User file API (``--derived my_obs.py`` and ``--reweight my_obs.py``), a plain Python file that defines

``DERIVED = {"name": (("in1", "in2"), function), ...}``
    ``function(mean_in1, mean_in2) -> float`` of the means of the named observables (datasets under
    ``observables/`` of shape ``(n,)``, or components ``"name[i]"`` of ``(n, k)`` ones); an optional
    third element is a description. Errors by the Gamma method of the derived quantity (linearised).

``LOG_WEIGHT(fields, couplings) -> log_w``
    ``fields`` a numpy array of stored configurations ``(B, *field_shape)`` in the stored dtype,
    ``couplings`` the ensemble's couplings (dict); returns the log reweighting factor ``(B,)`` of each,
    e.g. ``-(S_new - S_old)``. Means become ``<O w>/<w>``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latflow.analysis import DerivedObservable
from latflow.analysis.multi import analyze_ensembles
from latflow.ensemble import EnsembleReader

from .config import JobError

__all__ = ["REWEIGHT_COUPLINGS", "analyze", "builtin_derived", "effective_mass", "load_user_file"]

#: Couplings the theory reweights to (``--reweight KEY=VALUE``): the theory recomputes the action.
REWEIGHT_COUPLINGS: dict[str, tuple[str, ...]] = {"phi4": ("m2", "lam"), "u1": ("beta",), "su3": ("beta",)}
#: Configurations per block when the theory computes actions for reweighting.
_BLOCK = 256


# --- user files --------------------------------------------------------------------------------


def load_user_file(path: str | Path, option: str) -> dict[str, Any]:
    """Execute a ``--derived``/``--reweight`` Python file and return its namespace.

    Raises
    ------
    JobError
        Missing file, syntax error or an exception while it runs: one line naming the file and the option.
    """
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: {option}: no such file (expected a Python file defining DERIVED or LOG_WEIGHT)")
    spec = importlib.util.spec_from_file_location(f"_latflow_user_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        source = path.read_text(encoding="utf-8")
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise JobError(f"{path}: {option}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: {option}: cannot read: {exc}") from None
    sys.modules[spec.name] = module  # what dataclasses and pickling in the file look up
    try:
        exec(code, module.__dict__)  # noqa: S102 (the user's own analysis code, run on request)
    except Exception as exc:  # noqa: BLE001 (any error of user code becomes one line)
        raise JobError(f"{path}: {option}: the file raised {type(exc).__name__}: {exc}") from None
    return module.__dict__


def derived_from_file(path: str | Path, allowed: Sequence[str]) -> dict[str, DerivedObservable]:
    """``DERIVED`` of a user file, checked: names, inputs present in the ensemble, callables.

    Parameters
    ----------
    path : path
        The ``--derived`` file.
    allowed : sequence of str
        Observable names (and components) of the ensemble.
    """
    ns = load_user_file(path, "--derived")
    table = ns.get("DERIVED")
    if not isinstance(table, Mapping):
        raise JobError(
            f"{path}: --derived: defines no DERIVED dict; expected DERIVED = {{'name': (('in1', 'in2'), function)}}"
        )
    out = {}
    for name, entry in table.items():
        if isinstance(entry, DerivedObservable):
            inputs, func, text = entry.inputs, entry.func, entry.description
        elif isinstance(entry, (tuple, list)) and len(entry) in (2, 3):
            inputs, func, text = entry[0], entry[1], (entry[2] if len(entry) == 3 else "")
        else:
            raise JobError(
                f"{path}: DERIVED[{name!r}]: expected ((inputs...), function) or ((inputs...), function, text)"
            )
        if isinstance(inputs, str):
            inputs = (inputs,)
        if not callable(func) or not all(isinstance(i, str) for i in inputs) or not inputs:
            raise JobError(f"{path}: DERIVED[{name!r}]: expected a non-empty tuple of observable names and a function")
        missing = [i for i in inputs if i not in allowed]
        if missing:
            raise JobError(
                f"{path}: DERIVED[{name!r}]: no observable {', '.join(map(repr, missing))} in the ensemble; "
                f"allowed: {', '.join(allowed)}"
            )
        try:
            inspect.signature(func).bind(*inputs)
        except TypeError as exc:
            raise JobError(
                f"{path}: DERIVED[{name!r}]: the function does not take {len(inputs)} means: {exc}"
            ) from None
        except ValueError:  # no signature to inspect (some builtins): called as it is
            pass
        out[str(name)] = DerivedObservable(tuple(inputs), _guarded(func), str(text) or f"from {Path(path).name}")
    return out


def _guarded(func: Callable[..., float]) -> Callable[..., float]:
    """``func`` with any exception turned into a ValueError (the analysis skips the quantity with a warning)."""

    def call(*means: float) -> float:
        try:
            return func(*means)
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 (user code)
            raise ValueError(f"{type(exc).__name__}: {exc}") from None

    return call


# --- built-in derived observables --------------------------------------------------------------


def effective_mass(t: int, n_t: int, form: str) -> Callable[[float, float], float]:
    """``m_eff(t)`` from the means ``C(t)``, ``C(t+1)`` of a correlator of period ``n_t``.

    ``form = "log"``: ``log(C(t) / C(t+1))``; ``"cosh"``: the ``m`` solving
    ``C(t) / C(t+1) = cosh(m (T/2 - t)) / cosh(m (T/2 - t - 1))`` (a periodic correlator, ``t + 1 < T/2``).
    """
    if form == "log":
        return lambda c0, c1: math.log(c0 / c1)
    half = n_t / 2.0

    def cosh_mass(c0: float, c1: float) -> float:
        from scipy.optimize import brentq

        ratio = c0 / c1
        if not ratio > 1.0:
            raise ValueError(f"C({t})/C({t + 1}) = {ratio:.4g} <= 1: no cosh effective mass")

        def g(m: float) -> float:
            return math.cosh(m * (half - t)) / math.cosh(m * (half - t - 1)) - ratio

        hi = 1.0
        while g(hi) < 0:
            hi *= 2.0
            if hi > 200:
                raise ValueError(f"C({t})/C({t + 1}) = {ratio:.4g}: cosh effective mass out of range")
        return float(brentq(g, 1e-12, hi, xtol=1e-14))

    return cosh_mass


def builtin_derived(
    theory_name: str, volume: int, shapes: Mapping[str, tuple[int, ...]], masses: Mapping[str, str]
) -> dict[str, DerivedObservable]:
    """Derived observables built from the stored observables, beyond the theory's own.

    * ``susceptibility`` (phi^4): ``V (<M^2> - <M>^2)`` from ``chi2`` and ``magnetization`` (the full
      susceptibility; ``chi2_connected`` with ``<|M|>`` is the theory's own);
    * ``topological_susceptibility_connected``: ``(<Q^2> - <Q>^2) / V`` where both are stored;
    * ``static_potential_RxT``: ``log(W(R,T) / W(R,T+1))`` of stored Wilson loops (a ratio);
    * ``m_eff_<name>[t]``: effective masses of a correlator ``observables/<name>`` of shape ``(n, T)``,
      for every name in ``masses`` (``{name: "log" | "cosh"}``), ``t = 0 .. T-2`` (cosh: ``t + 1 < T/2``).
    """
    out: dict[str, DerivedObservable] = {}
    if theory_name == "phi4" and {"chi2", "magnetization"} <= set(shapes):
        out["susceptibility"] = DerivedObservable(
            ("chi2", "magnetization"), lambda c, m: c - volume * m * m, "V (<M^2> - <M>^2)"
        )
    if {"topological_charge", "topological_charge_sq"} <= set(shapes):
        out["topological_susceptibility_connected"] = DerivedObservable(
            ("topological_charge_sq", "topological_charge"), lambda q2, q: (q2 - q * q) / volume, "(<Q^2> - <Q>^2) / V"
        )
    loops = {tuple(map(int, m.groups())) for k in shapes if (m := re.fullmatch(r"wilson_loop_(\d+)x(\d+)", k))}
    for r, t in sorted(loops):
        if (r, t + 1) in loops:
            out[f"static_potential_{r}x{t}"] = DerivedObservable(
                (f"wilson_loop_{r}x{t}", f"wilson_loop_{r}x{t + 1}"),
                lambda a, b: math.log(a / b),
                f"log(W({r},{t}) / W({r},{t + 1}))",
            )
    for name, form in masses.items():
        n_t = shapes[name][0]
        last = n_t - 1 if form == "log" else math.ceil(n_t / 2) - 1
        for t in range(last):
            out[f"m_eff_{name}[{t}]"] = DerivedObservable(
                (f"{name}[{t}]", f"{name}[{t + 1}]"), effective_mass(t, n_t, form), f"{form} effective mass"
            )
    return out


# --- reweighting --------------------------------------------------------------------------------


def parse_couplings(text: str, theory_name: str, couplings: Mapping[str, Any]) -> dict[str, float]:
    """``"beta=2.1"`` or ``"m2=-4.1,lam=7"`` -> the full coupling dict at the target point."""
    allowed = REWEIGHT_COUPLINGS.get(theory_name)
    if allowed is None:
        supported = ", ".join(f"{k} ({', '.join(v)})" for k, v in REWEIGHT_COUPLINGS.items())
        raise JobError(
            f"--reweight {text!r}: theory {theory_name!r} is not reweighted by coupling; supported: {supported}"
        )
    target = dict(couplings)
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or key not in allowed or not math.isfinite(number):
            raise JobError(
                f"--reweight {text!r}: expected KEY=VALUE with KEY one of {', '.join(allowed)} and a finite number, "
                "or 'log_w', or a Python file defining LOG_WEIGHT"
            )
        target[key] = number
    return target


def _stored_rows(r: EnsembleReader) -> np.ndarray:
    """Row of every committed stored configuration ``(m,)``."""
    if r.has("fields/row"):
        return np.asarray(r.read("fields/row"), dtype=np.int64).reshape(-1)
    return np.arange(int(r.n_committed))


def _blocks(r: EnsembleReader, name: str) -> Any:
    """Stored configurations ``(b, *field_shape)`` in blocks of at most ``_BLOCK``."""
    m = len(_stored_rows(r))
    for start in range(0, m, _BLOCK):
        yield r.read(name, slice(start, min(start + _BLOCK, m)))


def _field_name(r: EnsembleReader, path: Path) -> str:
    names = r.names("fields")
    names = [n for n in names if n != "row"]
    if not names:
        raise JobError(f"{path}: --reweight: the ensemble stores no configurations (fields/*)")
    return f"fields/{names[0]}"


def _theory(name: str, couplings: Mapping[str, Any], shape: Sequence[int], what: str) -> Any:
    from latflow.lattice import Lattice
    from latflow.theories import get_spec

    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.params)}
    try:
        return spec.build(spec.params(**{k: v for k, v in couplings.items() if k in fields}), Lattice(tuple(shape)))
    except (TypeError, ValueError) as exc:
        raise JobError(f"--reweight {what!r}: {exc}") from None


def coupling_log_w(path: Path, text: str) -> np.ndarray:
    """Per-row ``log w = S_old - S_new`` of one file at the couplings of ``text`` (NaN where no configuration)."""
    import torch

    with EnsembleReader(path) as r:
        target = parse_couplings(text, r.theory, r.couplings)
        old = _theory(r.theory, r.couplings, r.lattice_shape, text)
        new = _theory(r.theory, target, r.lattice_shape, text)
        out = np.full(int(r.n_committed), np.nan)
        rows, field = _stored_rows(r), _field_name(r, path)
        parts = []
        with torch.no_grad():
            for x in _blocks(r, field):
                t = torch.from_numpy(np.ascontiguousarray(x))
                parts.append((old.action(t) - new.action(t)).double().numpy())
    if parts:
        out[rows] = np.concatenate(parts)
    return out


def user_log_w(path: Path, ns: Mapping[str, Any], source: Path) -> np.ndarray:
    """Per-row ``LOG_WEIGHT(fields, couplings)`` of a user file (NaN where no configuration)."""
    func = ns.get("LOG_WEIGHT")
    if not callable(func):
        raise JobError(f"{source}: --reweight: defines no function LOG_WEIGHT(fields, couplings) -> log weights")
    with EnsembleReader(path) as r:
        out = np.full(int(r.n_committed), np.nan)
        rows, field, couplings = _stored_rows(r), _field_name(r, path), dict(r.couplings)
        parts = []
        for x in _blocks(r, field):
            try:
                lw = np.asarray(func(x, couplings), dtype=np.float64).reshape(-1)
            except Exception as exc:  # noqa: BLE001
                raise JobError(f"{source}: LOG_WEIGHT raised {type(exc).__name__}: {exc}") from None
            if lw.shape != (len(x),):
                raise JobError(f"{source}: LOG_WEIGHT returned {lw.size} values for {len(x)} configurations")
            parts.append(lw)
    if parts:
        out[rows] = np.concatenate(parts)
    return out


def stored_log_w(path: Path) -> np.ndarray:
    """``weights/log_w`` of one file ``(n,)``."""
    with EnsembleReader(path) as r:
        if not r.has("weights/log_w"):
            raise JobError(f"{path}: --reweight log_w: the ensemble has no weights/log_w")
        return np.asarray(r.read("weights/log_w"), dtype=np.float64).reshape(-1)


def reweight_log_w(paths: Sequence[Path], specs: Sequence[str]) -> tuple[list[np.ndarray], str]:
    """Per-file log weights (summed over ``specs``) and a label, e.g. ``"beta=2.1"``."""
    total = None
    for spec in specs:
        if spec.endswith(".py"):
            ns = load_user_file(spec, "--reweight")
            parts = [user_log_w(p, ns, Path(spec)) for p in paths]
        elif spec == "log_w":
            parts = [stored_log_w(p) for p in paths]
        else:
            parts = [coupling_log_w(p, spec) for p in paths]
        total = parts if total is None else [a + b for a, b in zip(total, parts, strict=True)]
    bad = [p for p, lw in zip(paths, total, strict=True) if np.any(np.isposinf(lw)) or not np.any(np.isfinite(lw))]
    if bad:
        raise JobError(f"{bad[0]}: --reweight {' + '.join(specs)}: no finite reweighting factors")
    return total, " + ".join(specs)


# --- the command ---------------------------------------------------------------------------------


def _observable_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with EnsembleReader(path) as r:
        return {ds: tuple(np.shape(r.read(f"observables/{ds}"))[1:]) for ds in r.names("observables")}


def _parse_masses(items: Sequence[str], shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, str]:
    out = {}
    correlators = [k for k, s in shapes.items() if len(s) == 1]
    for item in items:
        name, _, form = item.partition(":")
        form = form or "log"
        if name not in correlators or form not in ("log", "cosh"):
            raise JobError(
                f"{path}: --effective-mass {item!r}: expected NAME[:log|cosh] with NAME a correlator (n, T) of the "
                f"ensemble; allowed NAME: {', '.join(correlators) or 'none'}"
            )
        out[name] = form
    return out


def analyze(
    paths: Sequence[str | Path],
    *,
    means: Mapping[str, float] | None = None,
    check_checksums: bool = True,
    errors: str = "gamma",
    bin_size: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    derived_files: Sequence[str] = (),
    reweight: Sequence[str] = (),
    effective_masses: Sequence[str] = (),
) -> dict:
    """``latflow analyze A.h5 [B.h5 ...]``: the theory's and the user's derived observables, reweighting,
    error method; see :func:`latflow.analysis.multi.analyze_ensembles`."""
    from latflow.analysis import ERROR_METHODS

    from .runner import _derived_of, _exact_means_of, _theory_of_ensemble

    paths = [Path(p) for p in paths]
    if errors not in ERROR_METHODS:
        raise JobError(f"{paths[0]}: --errors {errors!r}: allowed: {', '.join(ERROR_METHODS)}")
    if bin_size is not None and bin_size < 1 or n_boot < 2:
        raise JobError(f"{paths[0]}: --bin-size {bin_size} / --n-boot {n_boot}: allowed: bin size >= 1, n-boot >= 2")
    with EnsembleReader(paths[0]) as r:
        theory = _theory_of_ensemble(r.theory, r.couplings, tuple(r.lattice_shape))
        name, volume, weighted = r.theory, int(np.prod(r.lattice_shape)), r.is_weighted
    shapes = _observable_shapes(paths[0])
    allowed = sorted(set(shapes) | {f"{k}[{i}]" for k, s in shapes.items() if len(s) == 1 for i in range(s[0])})
    derived = _derived_of(theory)
    for k, v in builtin_derived(name, volume, shapes, _parse_masses(effective_masses, shapes, paths[0])).items():
        derived.setdefault(k, v)
    for f in derived_files:
        derived.update(derived_from_file(f, allowed))
    known = {k: v for k, v in _exact_means_of(theory).items() if k in shapes}
    known.update(means or {})
    log_w, label = reweight_log_w(paths, reweight) if reweight else (None, "")
    exact = getattr(theory, "exact_log_z", None)
    log_z = exact() if weighted and callable(exact) and len(paths) == 1 else None
    return analyze_ensembles(
        paths,
        derived=derived,
        known_means=known,
        check_checksums=check_checksums,
        errors=errors,
        bin_size=bin_size,
        n_boot=n_boot,
        seed=seed,
        log_weights=log_w,
        reweight_label=label,
        exact_log_z=log_z,
    )
