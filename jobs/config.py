"""Job files: TOML validated into typed, frozen dataclasses before anything runs.

Every user mistake becomes a :class:`JobError` whose one-line message names the
file, the key and what is allowed. Command-line overrides (``--set key=value``)
are applied to the parsed TOML and validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from latflow.fermions.conditional import DEFAULT_DISPERSION
from latflow.lattice import Lattice
from latflow.manifolds import SUN, Euclidean, FieldManifold, U1Angles
from latflow.theories import REGISTRY


class JobError(Exception):
    """A mistake in a job file, an override or a command-line argument (one-line message)."""


@dataclass(frozen=True)
class LatticeConfig:
    """``shape``: extents ``[L0, ..., L{d-1}]``, axis 0 is time."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class TheoryConfig:
    """``name`` from the theory registry plus that theory's couplings."""

    name: str
    couplings: Any  # the theory's params dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Flow model.

    ``affine``: real-NVP affine couplings with checkerboard masks, for scalar fields
    (``prior_sigma`` sets the Gaussian prior). ``u1-equivariant``: gauge-equivariant
    plaquette couplings for 2D U(1) links (Kanwar et al. 2020), with inner circle maps
    ``inner`` = ``ncp`` (``n_mix`` mixture components) or ``spline`` (``n_bins``), on the prior
    ``prior``: ``"haar"`` (uniform links) or ``"plaquette"`` (independent von Mises plaquettes on the 2D
    torus, :class:`latflow.plaquette_prior.U1PlaquettePrior`, with concentration ``prior_beta``; default the
    theory's gauge ``beta``). With the plaquette prior ``n_layers = 0`` is allowed: the prior alone is the
    proposal (nothing to train). ``sun-spectral``: gauge-equivariant spectral couplings for SU(N) links
    (Boyda et al. 2020; :func:`latflow.flows.sun_layers.make_sun_spectral_flow`, d = 2 to 4): each active loop's
    eigenphases move by ``n_bins``-bin splines on the maximal torus, conditioned on frozen loops through
    convolutions (``hidden``, ``kernel_size``); ``prior`` ``"haar"`` or ``"plaquette"`` (2D: independent
    single-plaquette SU(N) densities, :class:`latflow.sun_plaquette_prior.SUNPlaquettePrior`, with ``prior_beta``).
    """

    kind: Literal["affine", "u1-equivariant", "sun-spectral"] = "affine"
    n_layers: int = 8
    hidden: tuple[int, ...] = (8, 8)
    kernel_size: int = 3
    prior_sigma: float = 1.0
    inner: Literal["ncp", "spline"] = "ncp"
    n_mix: int = 6
    n_bins: int = 8
    prior: Literal["haar", "plaquette"] = "haar"
    prior_beta: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Reverse-KL self-training with Adam (:class:`latflow.training.ReverseKLTrainer`).

    ``estimator``: gradient of the reverse KL, ``reparam`` (reparameterised, the default), ``path``
    (path gradient, Vaitl et al. 2022: the zero-mean score term dropped, less noise near the
    optimum) or ``reinforce`` (score function with a leave-one-out baseline; never differentiates
    the action). ``lr_schedule``: ``constant``, ``cosine`` (from ``lr`` down to ``lr_min`` at the
    last step) or ``exponential`` (geometric decay from ``lr`` to ``lr_min > 0`` at the last step),
    after ``warmup_steps`` steps of linear warm-up; ``lr_min`` must lie below ``lr``.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    checkpoint_every: int = 200
    grad_clip: float = 0.0
    log_every: int = 100
    estimator: Literal["reparam", "path", "reinforce"] = "reparam"
    lr_schedule: Literal["constant", "cosine", "exponential"] = "constant"
    warmup_steps: int = 0
    lr_min: float = 0.0
    # the action the flow learns for a theory with fermions: "auto" (pf-flow-mcmc: the gauge action, else the
    # theory's action), "gauge" or "full" (S_g - log det(D^dag D); above dense_max_volume a stochastic
    # determinant gradient); latflow.fermions.training_target
    target: Literal["auto", "gauge", "full"] = "auto"


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings. ``n_samples`` and ``thermalization`` count Markov steps per chain.

    Flow-MCMC uses ``batch_size`` (proposals per flow call); HMC uses the
    remaining keys (``n_chains`` chains per process, batched). ``pf-hmc`` (theories
    with fermions) is HMC with Nf = 2 pseudofermions and adds ``even_odd``,
    ``hasenbusch_kappas`` (increasing, below the theory's kappa; one extra pseudofermion
    each), ``cg_tol`` and ``cg_max_iter``. On a theory with fermions, ``hmc`` and
    ``flow-mcmc`` use the exact effective action (dense determinants: small lattices);
    ``pf-flow-mcmc`` is flow-MCMC in the joint space of links and pseudofermions (a
    gauge-covariant conditional proposes the pseudofermions; CG solves, no determinants;
    the flow is trained on the gauge action) and takes the same pseudofermion keys, plus the
    conditional that proposes the pseudofermions: ``conditional`` (``"triangular"``, gauge-covariant
    triangular maps; ``"exact"``, the dense heatbath, small lattices; ``"scalar"``),
    ``conditional_dispersion`` (widens the conditional, ``M -> dispersion M``; the default 1.1 is the
    validated one, see :data:`latflow.fermions.conditional.DEFAULT_DISPERSION`) and
    ``conditional_nested`` (full lattice: nested triangular Schur complement).

    ``thermalization``: steps discarded before the first recorded row. Default: one proposal batch
    (``batch_size`` steps) for flow-MCMC, whose chains start from an importance-resampled proposal;
    0 for HMC, whose ``n_tune`` tuning trajectories come first, and ``n_tune`` untuned trajectories
    for HMC with ``tune = false`` (:attr:`burn_in`).

    ``start`` (HMC and PF-HMC): where the chains begin. ``"default"``: the theory's own start (small
    random fields ``0.1 N(0, 1)`` for real fields and U(1) angles, as always; unit links for SU(N));
    ``"cold"``: the classical vacuum (zero fields, unit links); ``"hot"``: uniform (Haar) links, standard
    normal real fields; any other value is a file: an ensemble ``.h5`` (its last stored configuration
    starts every chain) or a configuration file read by ``latflow.configio.read_configuration``.
    """

    kind: Literal["flow-mcmc", "hmc", "pf-hmc", "pf-flow-mcmc"] = "flow-mcmc"
    n_samples: int = 10000
    thermalization: int | None = None
    commit_every: int = 1000
    log_every: int = 1000
    batch_size: int = 256
    n_chains: int = 16
    step_size: float = 0.1
    n_steps: int = 10
    integrator: Literal["leapfrog", "omelyan"] = "omelyan"
    step_jitter: float = 0.2
    tune: bool = True
    n_tune: int = 200
    target_acceptance: float = 0.8
    even_odd: bool = False
    hasenbusch_kappas: tuple[float, ...] = ()
    cg_tol: float = 1e-10
    cg_max_iter: int = 10000
    conditional: Literal["triangular", "exact", "scalar"] = "triangular"
    conditional_dispersion: float = DEFAULT_DISPERSION
    conditional_nested: bool = True
    start: str = "default"

    @property
    def burn_in(self) -> int:
        """``thermalization``, or its default for the kind (see the class notes)."""
        if self.thermalization is not None:
            return self.thermalization
        if self.kind in ("flow-mcmc", "pf-flow-mcmc"):
            return self.batch_size
        # HMC: the n_tune tuning trajectories are the warm-up; without tuning, as many plain ones
        return 0 if (self.tune and self.n_tune) else self.n_tune


@dataclass(frozen=True)
class OutputConfig:
    """``path``: the ensemble; ``model``: the flow checkpoint (default: ``<path stem>.model.pt``).

    ``save_every``: store a configuration (``fields/*``) every ``save_every`` Markov steps of each
    chain; observables, weights and Markov data are stored at every step (``fields/row`` maps the
    stored configurations to their rows). The default 1 keeps every configuration: an ensemble is
    kept to measure what was not thought of when it was made, and thinning cannot be undone. For
    long, strongly correlated chains (HMC at large beta) choose about tau_int of the slowest
    observable you might still want to measure. ``compression``: HDF5 filter on ``fields/*``
    (``"gzip"`` at ``compression_level`` 1-9, or ``"lzf"``; with byte shuffling); checksums are
    over the stored values, so they do not depend on it.
    """

    path: str
    model: str = ""
    save_every: int = 1
    compression: Literal["none", "gzip", "lzf"] = "none"
    compression_level: int = 4

    @property
    def model_path(self) -> Path:
        if self.model:
            return Path(self.model)
        p = Path(self.path)
        return p.with_name(p.stem + ".model.pt")


@dataclass(frozen=True)
class RunConfig:
    """Seed, device, floating-point precision and CPU threads of the run.

    ``threads``: torch intra-op threads per process. Small lattices run fastest on one
    thread (2 threads on a 2-core machine made a 6x6 training step 10x slower under load);
    0 means torch's default, or the cores divided among the MPI ranks.
    """

    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float64", "float32"] = "float64"
    threads: int = 1


@dataclass(frozen=True)
class JobConfig:
    """A validated job."""

    theory: TheoryConfig
    lattice: LatticeConfig
    model: ModelConfig
    train: TrainConfig
    sampler: SamplerConfig
    output: OutputConfig
    run: RunConfig
    source: str = "<job>"
    text: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def record(self) -> str:
        """The job as recorded in outputs: the file's text plus the command-line changes to it.

        ``text`` alone would misdescribe an ensemble made with ``--set``/``--out``/``--device``;
        the changes are appended as TOML comments so the record stays valid TOML.
        """
        if not self.overrides:
            return self.text
        lines = "".join("#   " + o.replace("\r", "\\r").replace("\n", "\\n") + "\n" for o in self.overrides)
        sep = "" if not self.text or self.text.endswith("\n") else "\n"
        return f"{self.text}{sep}# latflow command-line overrides applied to this job:\n{lines}"

    @property
    def uses_flow(self) -> bool:
        return self.sampler.kind in ("flow-mcmc", "pf-flow-mcmc")


SECTIONS: dict[str, type] = {
    "lattice": LatticeConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sampler": SamplerConfig,
    "output": OutputConfig,
    "run": RunConfig,
}
ALL_SECTIONS = ("theory", *SECTIONS)
# checks on values beyond their type: (predicate, what is allowed)
POSITIVE = (lambda v: v > 0, "a positive number")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "run.threads": NON_NEGATIVE,
    "model.n_layers": NON_NEGATIVE,
    "model.prior_beta": NON_NEGATIVE,
    "model.kernel_size": (lambda v: v > 0 and v % 2 == 1, "a positive odd integer"),
    "model.prior_sigma": POSITIVE,
    "model.n_mix": POSITIVE,
    "model.n_bins": POSITIVE,
    "model.hidden": (lambda v: all(c > 0 for c in v), "a list of positive integers"),
    "train.steps": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.lr": POSITIVE,
    "train.checkpoint_every": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.log_every": POSITIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.lr_min": NON_NEGATIVE,
    "sampler.n_samples": POSITIVE,
    "sampler.thermalization": NON_NEGATIVE,
    "sampler.commit_every": POSITIVE,
    "sampler.log_every": POSITIVE,
    "sampler.batch_size": POSITIVE,
    "sampler.n_chains": POSITIVE,
    "sampler.step_size": POSITIVE,
    "sampler.n_steps": POSITIVE,
    "sampler.step_jitter": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "sampler.n_tune": NON_NEGATIVE,
    "sampler.target_acceptance": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "sampler.hasenbusch_kappas": (
        lambda v: all(0 < k < 0.5 for k in v) and all(a < b for a, b in zip(v, v[1:])),
        "a strictly increasing list of numbers in (0, 0.5)",
    ),
    "sampler.cg_tol": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "sampler.cg_max_iter": POSITIVE,
    "sampler.conditional_dispersion": (lambda v: 0.5 <= v <= 4, "a number in [0.5, 4] (1.1 is the validated default)"),
    "sampler.start": (lambda v: v.strip() != "", "'default', 'cold', 'hot' or a configuration or ensemble file"),
    "output.path": (lambda v: v.strip() != "", "a non-empty file name"),
    "output.save_every": POSITIVE,
    "output.compression_level": (lambda v: 1 <= v <= 9, "an integer in [1, 9]"),
    "run.seed": (lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)"),
}
# what a required section must hold (for the message when it is missing)
REQUIRED_SECTIONS = {
    "theory": "name = one of {theories} and that theory's couplings",
    "lattice": "shape = [L0, L1, ...]",
    "output": 'path = "<ensemble>.h5"',
}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(
            inner, str(inner)
        )
    if origin in (typing.Union, types.UnionType):  # optional keys: describe what may be written
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple):
        return all(_finite(v) for v in value)
    return True


def build_dataclass(cls: type, table: Any, section: str, source: str) -> Any:
    """Validate the TOML table ``table`` into ``cls``; ``JobError`` names file and key."""
    if not isinstance(table, dict):
        raise JobError(f"{source}: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise JobError(
            f"{source}: unknown key '{section}.{unknown[0]}'; allowed keys in [{section}]: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise JobError(f"{source}: missing key '{key}' ({_describe(hints[name])})")
            continue
        value = table[name]
        try:
            value = _coerce(value, hints[name])
        except TypeError:
            raise JobError(f"{source}: '{key}' = {value!r}: expected {_describe(hints[name])}") from None
        if not _finite(value):
            raise JobError(f"{source}: '{key}' = {table[name]!r}: must be a finite number")
        rule = RULES.get(key)
        if rule is not None and not rule[0](value):
            raise JobError(f"{source}: '{key}' = {table[name]!r}: must be {rule[1]}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own checks (e.g. a theory's couplings)
        raise JobError(f"{source}: [{section}]: {exc}") from None


def _theory(table: Any, source: str) -> TheoryConfig:
    if not isinstance(table, dict) or "name" not in table:
        raise JobError(f"{source}: missing key 'theory.name'; known theories: {', '.join(sorted(REGISTRY))}")
    name = table["name"]
    if not isinstance(name, str) or name not in REGISTRY:
        raise JobError(f"{source}: 'theory.name' = {name!r}: must be one of {', '.join(sorted(REGISTRY))}")
    params = build_dataclass(REGISTRY[name].params, {k: v for k, v in table.items() if k != "name"}, "theory", source)
    return TheoryConfig(name=name, couplings=params)


def _lattice(table: Any, source: str) -> LatticeConfig:
    cfg = build_dataclass(LatticeConfig, table, "lattice", source)
    if not 1 <= len(cfg.shape) <= 4:
        raise JobError(f"{source}: 'lattice.shape' = {list(cfg.shape)}: must have 1 to 4 extents")
    for n in cfg.shape:
        if n <= 0:
            raise JobError(f"{source}: 'lattice.shape' = {list(cfg.shape)}: extents must be positive integers")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lattice.shape=[6,6]"`` -> ``(["lattice", "shape"], [6, 6])``; a bare word is a string."""
    if "=" not in text:
        raise JobError(f"--set {text!r}: expected KEY=VALUE, e.g. --set theory.lam=0.5")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise JobError(f"--set {text!r}: KEY must be SECTION.NAME with SECTION one of {', '.join(ALL_SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def load_job(
    path: str | Path,
    overrides: typing.Sequence[str] = (),
    *,
    out: str | None = None,
    device: str | None = None,
    text: str | None = None,
) -> JobConfig:
    """Read, override and validate a job file.

    Parameters
    ----------
    path
        The TOML job file (its name is used in messages).
    overrides
        ``SECTION.KEY=VALUE`` strings (``--set``); values are TOML values, bare words strings.
    out
        Replaces ``output.path`` (``--out``).
    device
        Replaces ``run.device`` (``--device``).
    text
        The file's text, if already read (e.g. a packaged example).
    """
    source = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise JobError(f"{source}: no such job file") from None
        except IsADirectoryError:
            raise JobError(f"{source}: is a directory, not a job file (TOML)") from None
        except UnicodeDecodeError:
            raise JobError(f"{source}: not a TOML job file (not UTF-8 text)") from None
        except OSError as exc:
            raise JobError(f"{source}: cannot read job file ({exc.__class__.__name__})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"{source}: not valid TOML ({exc})") from None
    unknown = sorted(set(raw) - set(ALL_SECTIONS))
    if unknown:
        raise JobError(f"{source}: unknown section or key '{unknown[0]}'; allowed sections: {', '.join(ALL_SECTIONS)}")
    for item in overrides:
        try:
            (section, key), value = parse_override(item)
        except JobError as exc:
            raise JobError(f"{source}: {exc}") from None
        if section not in ALL_SECTIONS:
            raise JobError(f"{source}: --set {item}: unknown section '{section}'; allowed: {', '.join(ALL_SECTIONS)}")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise JobError(f"{source}: [{section}] must be a table")
        table[key] = value
    if out is not None:
        raw.setdefault("output", {})["path"] = out
    if device is not None:
        raw.setdefault("run", {})["device"] = device
    for section, needs in REQUIRED_SECTIONS.items():
        if section not in raw:
            needs = needs.format(theories=", ".join(sorted(REGISTRY)))
            raise JobError(f"{source}: missing section [{section}]; it needs {needs}")
    theory = _theory(raw["theory"], source)
    lattice = _lattice(raw["lattice"], source)
    built = {
        name: build_dataclass(cls, raw.get(name, {}), name, source)
        for name, cls in SECTIONS.items()
        if name != "lattice"
    }
    changes = [f"--set {o}" for o in overrides]
    if out is not None:
        changes.append(f"--out {out}")
    if device is not None:
        changes.append(f"--device {device}")
    job = JobConfig(theory=theory, lattice=lattice, source=source, text=text, overrides=tuple(changes), **built)
    _check_consistency(job)
    return job


# the field manifold (family) each flow kind acts on
MODEL_MANIFOLD = {"affine": "real", "u1-equivariant": "u1", "sun-spectral": "sun"}
MANIFOLD_WORDS = {"real": "real scalar fields", "u1": "U(1) links", "sun": "SU(N) links"}
START_KEYWORDS = ("default", "cold", "hot")
HMC_KINDS = ("hmc", "pf-hmc")  # the samplers that start chains from sampler.start


def field_manifold(theory: Any) -> FieldManifold:
    """The manifold a theory's field lives on (:mod:`latflow.manifolds`).

    The theory's ``manifold`` (an attribute, or a method returning it); a theory that declares none has
    U(1) angles if its field is ``links`` and real scalars otherwise.
    """
    m = getattr(theory, "manifold", None)
    if m is not None and not isinstance(m, FieldManifold) and callable(m):
        m = m()
    if m is not None:
        return m
    return U1Angles() if getattr(theory, "field_name", "phi") == "links" else Euclidean()


def has_fermions(theory: Any) -> bool:
    """Whether a theory has dynamical fermions: it provides a Dirac operator ``dirac`` (and with it
    ``gauge_action`` for the pseudofermion samplers)."""
    return getattr(theory, "dirac", None) is not None


def theories_with_fermions() -> list[str]:
    """Registry names of the theories with fermions (:func:`has_fermions`), each built once on a 4x4 lattice
    at its default couplings (0.1 for couplings without a default); for messages."""
    names = []
    for name, spec in sorted(REGISTRY.items()):
        fields = dataclasses.fields(spec.params)
        couplings = {f.name: (f.default if f.default is not dataclasses.MISSING else 0.1) for f in fields}
        try:
            theory = spec.build(spec.params(**couplings), Lattice((4, 4)))
        except (TypeError, ValueError):
            continue
        if has_fermions(theory):
            names.append(name)
    return names


def manifold_family(m: FieldManifold) -> str:
    """``"real"``, ``"u1"`` or ``"sun"`` (every SU(N)): what a flow kind must match."""
    return "sun" if isinstance(m, SUN) else m.name


def _check_consistency(job: JobConfig) -> None:
    src = job.source
    spec = REGISTRY[job.theory.name]
    try:
        theory = spec.build(job.theory.couplings, Lattice(job.lattice.shape))
    except ValueError as exc:
        raise JobError(f"{src}: 'lattice.shape' = {list(job.lattice.shape)}: {exc}") from None
    fermions = has_fermions(theory)
    pseudofermions = job.sampler.kind in ("pf-hmc", "pf-flow-mcmc")
    if pseudofermions and not fermions:
        raise JobError(
            f"{src}: 'sampler.kind' = {job.sampler.kind!r} needs a theory with fermions "
            f"({', '.join(theories_with_fermions())}); theory '{job.theory.name}' has none: use 'hmc' or 'flow-mcmc'"
        )
    exact_dim, exact_max = getattr(theory, "dense_dim", None), getattr(theory, "dense_max_dim", None)
    if fermions and not pseudofermions and exact_dim is not None and exact_max is not None and exact_dim > exact_max:
        raise JobError(
            f"{src}: 'sampler.kind' = {job.sampler.kind!r} on 'lattice.shape' = {list(job.lattice.shape)} needs the "
            f"exact determinant of a {exact_dim}x{exact_dim} Dirac matrix (theory '{job.theory.name}' computes it up "
            f"to {exact_max} rows); use 'pf-hmc' or 'pf-flow-mcmc', or a smaller lattice"
        )
    if pseudofermions and job.sampler.even_odd:
        odd = [n for n in job.lattice.shape if n % 2]
        if odd:
            raise JobError(
                f"{src}: 'sampler.even_odd' = true on 'lattice.shape' = {list(job.lattice.shape)}: extent {odd[0]} "
                "is odd; even/odd preconditioning needs even extents (or set sampler.even_odd = false)"
            )
    exact_conditional = job.sampler.kind == "pf-flow-mcmc" and job.sampler.conditional == "exact"
    if exact_conditional and math.prod(job.lattice.shape) > 256:
        raise JobError(
            f"{src}: 'sampler.conditional' = 'exact' on 'lattice.shape' = {list(job.lattice.shape)}: the exact "
            "(dense heatbath) conditional is for volumes up to 256 sites; use 'triangular' or 'scalar'"
        )
    if pseudofermions and job.sampler.hasenbusch_kappas:
        kappa = float(job.theory.couplings.kappa)
        if max(job.sampler.hasenbusch_kappas) >= kappa:
            raise JobError(
                f"{src}: 'sampler.hasenbusch_kappas' = {list(job.sampler.hasenbusch_kappas)}: "
                f"must lie below theory.kappa = {kappa} (heavier Hasenbusch fermions)"
            )
    manifold = field_manifold(theory)
    family = manifold_family(manifold)
    has = f"{MANIFOLD_WORDS.get(family, family)} ({manifold.name})"
    if job.sampler.start != "default" and job.sampler.kind not in HMC_KINDS:
        raise JobError(
            f"{src}: 'sampler.start' = {job.sampler.start!r} is for sampler.kind {' or '.join(map(repr, HMC_KINDS))}; "
            f"{job.sampler.kind!r} starts from flow proposals: remove it"
        )
    if job.sampler.start not in START_KEYWORDS and job.sampler.kind in HMC_KINDS:
        start = Path(job.sampler.start)
        if not start.is_file():
            what = "is a folder" if start.is_dir() else "no such file"
            raise JobError(
                f"{src}: 'sampler.start' = {job.sampler.start!r}: {what}; allowed: "
                f"{', '.join(map(repr, START_KEYWORDS))}, an ensemble .h5 or a configuration file"
            )
    fits = [k for k, f in MODEL_MANIFOLD.items() if f == family]
    if not job.uses_flow:
        pass
    elif not fits:
        raise JobError(
            f"{src}: 'sampler.kind' = {job.sampler.kind!r}: theory '{job.theory.name}' has {has} and no flow "
            f"model.kind for them yet ({', '.join(f'{k!r}: {MANIFOLD_WORDS[f]}' for k, f in MODEL_MANIFOLD.items())}); "
            "allowed: 'hmc'"
        )
    elif MODEL_MANIFOLD[job.model.kind] != family:
        use = " or ".join([*(f"model.kind {k!r}" for k in fits), "sampler.kind 'hmc'"])
        raise JobError(
            f"{src}: 'model.kind' = {job.model.kind!r} is a flow for "
            f"{MANIFOLD_WORDS[MODEL_MANIFOLD[job.model.kind]]}; theory '{job.theory.name}' has {has}: use {use}"
        )
    elif job.model.kind == "affine":
        if job.model.prior != "haar" or job.model.prior_beta is not None:
            raise JobError(
                f"{src}: 'model.prior' = {job.model.prior!r}: model.kind 'affine' draws from a Gaussian "
                "(set its width with model.prior_sigma); 'prior' and 'prior_beta' are for model.kind 'u1-equivariant'"
            )
        if job.model.n_layers == 0:
            raise JobError(f"{src}: 'model.n_layers' = 0: model.kind 'affine' needs at least one layer")
        odd = [n for n in job.lattice.shape if n % 2]
        if odd:
            raise JobError(
                f"{src}: 'lattice.shape' = {list(job.lattice.shape)}: extent {odd[0]} is odd; "
                "the checkerboard masks of model.kind 'affine' need even extents"
            )
        if not 1 <= len(job.lattice.shape) <= 3:
            raise JobError(
                f"{src}: 'lattice.shape' = {list(job.lattice.shape)}: model.kind 'affine' supports 1 to 3 dimensions"
            )
    elif job.model.kind == "sun-spectral":
        _check_gauge_prior(job, spec)
        _check_sun_spectral(job)
    else:
        _check_gauge_prior(job, spec)
        from latflow.flows.gauge_layers import u1_masks

        try:
            if job.model.n_layers == 0:  # the prior alone: no coupling masks to fit
                return _check_output_paths(job)
            lat = Lattice(job.lattice.shape)
            for mu in range(2):
                for offset in range(4):
                    u1_masks(lat, mu, offset)
        except (ValueError, NotImplementedError) as exc:
            raise JobError(
                f"{src}: 'lattice.shape' = {list(job.lattice.shape)}: model.kind 'u1-equivariant': {exc}"
            ) from None
    t = job.train
    if t.lr_min >= t.lr:
        raise JobError(f"{src}: 'train.lr_min' = {t.lr_min} must lie below 'train.lr' = {t.lr}")
    if t.lr_schedule == "exponential" and t.lr_min <= 0:
        raise JobError(
            f"{src}: 'train.lr_schedule' = 'exponential' needs 'train.lr_min' > 0 (the rate it decays to), "
            f"got {t.lr_min}"
        )
    if t.estimator == "reinforce" and t.batch_size < 2:
        raise JobError(
            f"{src}: 'train.estimator' = 'reinforce' needs 'train.batch_size' >= 2 (leave-one-out baseline), "
            f"got {t.batch_size}"
        )
    if job.uses_flow and t.target != "auto":
        import torch

        from latflow.fermions.training_target import training_action

        try:
            training_action(theory, job.sampler.kind, t.target, estimator=t.estimator, generator=torch.Generator())
        except ValueError as exc:
            raise JobError(f"{src}: 'train.target' = {t.target!r}: {str(exc).removeprefix('train.')}") from None
    _check_output_paths(job)


def _check_output_paths(job: JobConfig) -> None:
    if job.output.model and Path(job.output.model).resolve() == Path(job.output.path).resolve():
        raise JobError(f"{job.source}: 'output.model' must differ from 'output.path'")


def _check_sun_spectral(job: JobConfig) -> None:
    """Lattice and prior of ``model.kind = 'sun-spectral'``."""
    src, shape = job.source, list(job.lattice.shape)
    if not 2 <= len(shape) <= 4:
        raise JobError(f"{src}: 'lattice.shape' = {shape}: model.kind 'sun-spectral' supports 2 to 4 dimensions")
    if job.model.n_layers:
        from latflow.flows.sun_layers import sun_coupling_schedule

        try:
            sun_coupling_schedule(Lattice(job.lattice.shape), job.model.n_layers)
        except (ValueError, NotImplementedError) as exc:
            raise JobError(f"{src}: 'lattice.shape' = {shape}: model.kind 'sun-spectral': {exc}") from None
    if job.model.prior == "plaquette":
        try:
            from latflow.sun_plaquette_prior import SUNPlaquettePrior  # noqa: F401
        except ImportError:
            raise JobError(
                f"{src}: 'model.prior' = 'plaquette': the SU(N) plaquette prior is not in this version; "
                "use model.prior = 'haar'"
            ) from None


def _check_gauge_prior(job: JobConfig, spec: Any) -> None:
    """``model.prior``, ``prior_beta`` and ``n_layers = 0`` of a gauge flow."""
    src, m = job.source, job.model
    if m.prior == "haar":
        if m.n_layers == 0:
            raise JobError(
                f"{src}: 'model.n_layers' = 0 with 'model.prior' = 'haar': the Haar measure alone is no proposal; "
                "use n_layers >= 1 or model.prior = 'plaquette'"
            )
        if m.prior_beta is not None:
            raise JobError(
                f"{src}: 'model.prior_beta' is set but 'model.prior' = 'haar'; use model.prior = 'plaquette'"
            )
        return
    if len(job.lattice.shape) != 2:
        raise JobError(
            f"{src}: 'model.prior' = 'plaquette' on 'lattice.shape' = {list(job.lattice.shape)}: independent "
            "plaquettes are a 2D torus property; use a 2D lattice or model.prior = 'haar'"
        )
    if m.prior_beta is None and not hasattr(job.theory.couplings, "beta"):
        raise JobError(f"{src}: 'model.prior' = 'plaquette' needs 'model.prior_beta' (theory has no beta)")


def to_dict(job: JobConfig) -> dict[str, Any]:
    """The resolved job as plain data (for logs and the ensemble's metadata)."""
    d = {name: dataclasses.asdict(getattr(job, name)) for name in SECTIONS}
    d["theory"] = {"name": job.theory.name, **dataclasses.asdict(job.theory.couplings)}
    return {k: d[k] for k in ALL_SECTIONS}


def sampler_settings(job: JobConfig) -> dict[str, Any]:
    """The ``sampler`` attribute of the ensemble: kind and the settings that kind uses.

    ``thermalization`` is the burn-in actually discarded (its default resolved). ``pf-flow-mcmc``
    adds the conditional (``conditional``, ``conditional_dispersion``, ``conditional_nested``).
    Theories whose observables have estimators to choose (Schwinger: exact dense below a volume,
    stochastic above) add ``measurement``: their ``measurement_settings()``.
    """
    s = job.sampler
    common = {"kind": s.kind, "n_samples": s.n_samples, "thermalization": s.burn_in, "commit_every": s.commit_every}
    theory = REGISTRY[job.theory.name].build(job.theory.couplings, Lattice(job.lattice.shape))
    if hasattr(theory, "measurement_settings"):
        common["measurement"] = theory.measurement_settings()
    pf = {
        "even_odd": s.even_odd,
        "hasenbusch_kappas": list(s.hasenbusch_kappas),
        "cg_tol": s.cg_tol,
        "cg_max_iter": s.cg_max_iter,
    }
    if s.kind in ("flow-mcmc", "pf-flow-mcmc"):
        flow = {**common, "batch_size": s.batch_size, "model": dataclasses.asdict(job.model), "dtype": job.run.dtype}
        conditional = {
            "conditional": s.conditional,
            "conditional_dispersion": s.conditional_dispersion,
            "conditional_nested": s.conditional_nested,
        }
        return {**flow, **pf, **conditional} if s.kind == "pf-flow-mcmc" else flow
    return {
        **common,
        "n_chains": s.n_chains,
        "step_size": s.step_size,
        "n_steps": s.n_steps,
        "integrator": s.integrator,
        "step_jitter": s.step_jitter,
        "tune": s.tune,
        "n_tune": s.n_tune,
        "target_acceptance": s.target_acceptance,
        "dtype": job.run.dtype,
        **(pf if s.kind == "pf-hmc" else {}),
        # recorded only when chosen, so that ensembles from before the key still resume
        **({"start": s.start} if s.start != "default" else {}),
    }


def storage_settings(job: JobConfig) -> dict[str, Any]:
    """The ``storage`` attribute of the ensemble: how often configurations are kept, and their filter."""
    o = job.output
    level = o.compression_level if o.compression == "gzip" else 0
    return {"save_every": o.save_every, "compression": o.compression, "compression_level": level}
