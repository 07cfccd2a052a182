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

from latflow.lattice import Lattice
from latflow.manifolds import SUN, Euclidean, FieldManifold, U1Angles
from latflow.theories import REGISTRY

from . import annealing_kinds  # noqa: F401  (registers the annealing sampler kinds)
from .sampler_kinds import (
    NON_NEGATIVE,
    POSITIVE,
    ConditionalSettings,
    Rule,
    SamplerSettings,
    kinds_with_key,
    sampler_kind,
    sampler_kind_names,
)

# the base of every sampler kind's settings (each kind's [sampler] table: jobs/sampler_kinds.py)
SamplerConfig = SamplerSettings


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

    ``comm``: how MPI ranks average training gradients: ``"mpi"`` (mpi4py, through a host buffer) or
    ``"torch"`` (``torch.distributed``: NCCL on CUDA tensors, gloo on CPU tensors, no host round trip).
    """

    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float64", "float32"] = "float64"
    threads: int = 1
    comm: Literal["mpi", "torch"] = "mpi"


@dataclass(frozen=True)
class JobConfig:
    """A validated job."""

    theory: TheoryConfig
    lattice: LatticeConfig
    model: ModelConfig
    train: TrainConfig
    sampler: SamplerSettings  # the settings class of the kind (jobs/sampler_kinds.py)
    output: OutputConfig
    run: RunConfig
    source: str = "<job>"
    text: str = ""
    overrides: tuple[str, ...] = ()
    resources: Any = None  # [resources] for `latflow submit` (jobs/submit.py: Resources), None if absent

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
        """Whether the sampler kind samples with a trained flow (from the sampler-kind registry)."""
        uses = sampler_kind(self.sampler.kind).uses_flow
        return bool(uses(self.sampler)) if callable(uses) else bool(uses)


SECTIONS: dict[str, type] = {
    "lattice": LatticeConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sampler": SamplerSettings,  # built as the settings class of sampler.kind
    "output": OutputConfig,
    "run": RunConfig,
}
ALL_SECTIONS = ("theory", *SECTIONS)
# tables a job file may hold besides the job itself: [resources] of batch jobs (jobs/submit.py)
JOB_FILE_TABLES = (*ALL_SECTIONS, "resources")
# checks on values beyond their type: (predicate, what is allowed); the sampler kinds hold their own
RULES: dict[str, Rule] = {
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


def build_dataclass(cls: type, table: Any, section: str, source: str, rules: typing.Mapping[str, Rule] = RULES) -> Any:
    """Validate the TOML table ``table`` into ``cls``; ``JobError`` names file and key.

    ``rules`` checks values beyond their type, by ``"section.key"`` (default :data:`RULES`).
    """
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
        rule = rules.get(key)
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


def _sampler(table: Any, source: str, file_table: Any, set_keys: typing.Collection[str]) -> SamplerSettings:
    """The ``[sampler]`` table validated into the settings class of its ``kind`` (default ``"flow-mcmc"``).

    A key the kind does not use is a one-line :class:`JobError` naming the kind's keys. When ``--set
    sampler.kind=...`` switches the file's kind (``file_table``: the table as the file has it; ``set_keys``:
    the sampler keys given with ``--set``), the file's settings of its own kind that the new kind does not
    use are left out; keys given with ``--set`` and keys no kind has are always checked.
    """
    if not isinstance(table, dict):
        raise JobError(f"{source}: [sampler] must be a table")
    name = table.get("kind", "flow-mcmc")
    try:
        kind = sampler_kind(name)
    except KeyError:
        known = ", ".join(map(repr, sampler_kind_names()))
        raise JobError(f"{source}: 'sampler.kind' = {name!r}: expected one of {known}") from None
    table = {**table, "kind": kind.name}
    file_kind = file_table.get("kind", "flow-mcmc") if isinstance(file_table, dict) else name
    if "kind" in set_keys and file_kind != kind.name and file_kind in sampler_kind_names():
        old = sampler_kind(file_kind).keys
        table = {k: v for k, v in table.items() if k in kind.keys or k in set_keys or k not in old}
    for key, value in table.items():
        if key in kind.keys:
            continue
        allowed = ", ".join(k for k in kind.keys if k != "kind")
        names = [repr(k) for k in kinds_with_key(key)]
        users = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        what = f" = {value!r} is for sampler.kind {users}, not" if users else " is not"
        raise JobError(
            f"{source}: 'sampler.{key}'{what} a setting of sampler kind {kind.name!r}; its settings: {allowed}"
        )
    rules = {f"sampler.{k}": r for k, r in kind.rules.items()}
    return build_dataclass(kind.settings, table, "sampler", source, rules)


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
    unknown = sorted(set(raw) - set(JOB_FILE_TABLES))
    if unknown:
        raise JobError(
            f"{source}: unknown section or key '{unknown[0]}'; allowed sections: {', '.join(JOB_FILE_TABLES)}"
        )
    file_sampler = dict(raw["sampler"]) if isinstance(raw.get("sampler"), dict) else raw.get("sampler")
    set_sampler_keys = set()
    for item in overrides:
        try:
            (section, key), value = parse_override(item)
        except JobError as exc:
            raise JobError(f"{source}: {exc}") from None
        if section not in JOB_FILE_TABLES:
            allowed = ", ".join(JOB_FILE_TABLES)
            raise JobError(f"{source}: --set {item}: unknown section '{section}'; allowed: {allowed}")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise JobError(f"{source}: [{section}] must be a table")
        table[key] = value
        if section == "sampler":
            set_sampler_keys.add(key)
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
        if name not in ("lattice", "sampler")
    }
    built["sampler"] = _sampler(raw.get("sampler", {}), source, file_sampler, set_sampler_keys)
    changes = [f"--set {o}" for o in overrides]
    if out is not None:
        changes.append(f"--out {out}")
    if device is not None:
        changes.append(f"--device {device}")
    if "resources" in raw:
        from .submit import build_resources

        built["resources"] = build_resources(raw["resources"], source)
    job = JobConfig(theory=theory, lattice=lattice, source=source, text=text, overrides=tuple(changes), **built)
    _check_consistency(job)
    return job


# the field manifold (family) each flow kind acts on
MODEL_MANIFOLD = {"affine": "real", "u1-equivariant": "u1", "sun-spectral": "sun"}
MANIFOLD_WORDS = {"real": "real scalar fields", "u1": "U(1) links", "sun": "SU(N) links"}
START_KEYWORDS = ("default", "cold", "hot")


def chain_start(sampler: SamplerSettings) -> str:
    """``sampler.start`` of the kinds whose table has it (:func:`~latflow.jobs.sampler_kinds.kinds_with_key`,
    the HMC kinds); ``"default"`` for the others, whose chains start from their own proposals."""
    return getattr(sampler, "start", "default")


def pseudofermion_kinds(pseudofermions: bool = True) -> tuple[str, ...]:
    """The registered sampler kinds with (or without) Nf = 2 pseudofermions, for messages."""
    return tuple(k for k in sampler_kind_names() if sampler_kind(k).pseudofermions == pseudofermions)


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
    s = job.sampler
    pseudofermions = sampler_kind(s.kind).pseudofermions
    if pseudofermions and not fermions:
        raise JobError(
            f"{src}: 'sampler.kind' = {s.kind!r} needs a theory with fermions "
            f"({', '.join(theories_with_fermions())}); theory '{job.theory.name}' has none: use "
            f"{' or '.join(map(repr, pseudofermion_kinds(False)))}"
        )
    exact_dim, exact_max = getattr(theory, "dense_dim", None), getattr(theory, "dense_max_dim", None)
    if fermions and not pseudofermions and exact_dim is not None and exact_max is not None and exact_dim > exact_max:
        raise JobError(
            f"{src}: 'sampler.kind' = {job.sampler.kind!r} on 'lattice.shape' = {list(job.lattice.shape)} needs the "
            f"exact determinant of a {exact_dim}x{exact_dim} Dirac matrix (theory '{job.theory.name}' computes it up "
            f"to {exact_max} rows); use {' or '.join(map(repr, pseudofermion_kinds()))}, or a smaller lattice"
        )
    if pseudofermions and job.sampler.even_odd:
        odd = [n for n in job.lattice.shape if n % 2]
        if odd:
            raise JobError(
                f"{src}: 'sampler.even_odd' = true on 'lattice.shape' = {list(job.lattice.shape)}: extent {odd[0]} "
                "is odd; even/odd preconditioning needs even extents (or set sampler.even_odd = false)"
            )
    exact_conditional = isinstance(s, ConditionalSettings) and s.conditional == "exact"
    if exact_conditional and math.prod(job.lattice.shape) > 256:
        raise JobError(
            f"{src}: 'sampler.conditional' = 'exact' on 'lattice.shape' = {list(job.lattice.shape)}: the exact "
            "(dense heatbath) conditional is for volumes up to 256 sites; use 'triangular' or 'scalar'"
        )
    # theories without a hopping parameter (yukawa) refuse Hasenbusch kappas in the runner's preflight
    if pseudofermions and job.sampler.hasenbusch_kappas and hasattr(job.theory.couplings, "kappa"):
        kappa = float(job.theory.couplings.kappa)
        if max(job.sampler.hasenbusch_kappas) >= kappa:
            raise JobError(
                f"{src}: 'sampler.hasenbusch_kappas' = {list(job.sampler.hasenbusch_kappas)}: "
                f"must lie below theory.kappa = {kappa} (heavier Hasenbusch fermions)"
            )
    manifold = field_manifold(theory)
    family = manifold_family(manifold)
    has = f"{MANIFOLD_WORDS.get(family, family)} ({manifold.name})"
    # sampler.start of a kind without it is refused while building the table (kinds_with_key("start"))
    if chain_start(s) not in START_KEYWORDS:
        start = Path(chain_start(s))
        if not start.is_file():
            what = "is a folder" if start.is_dir() else "no such file"
            raise JobError(
                f"{src}: 'sampler.start' = {chain_start(s)!r}: {what}; allowed: "
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

    ``kind``, ``n_samples``, ``thermalization`` (the burn-in actually discarded, its default resolved) and
    ``commit_every``; theories whose observables have estimators to choose (Schwinger: exact dense below a
    volume, stochastic above) add ``measurement``: their ``measurement_settings()``; then the kind's own
    settings (:attr:`~latflow.jobs.sampler_kinds.SamplerKind.attribute`: flow kinds ``batch_size``, ``model``,
    ``dtype``; HMC kinds their trajectory settings; ``pf-*`` the pseudofermion keys, ``pf-flow-mcmc`` the
    conditional). Resuming compares it.
    """
    s = job.sampler
    common = {"kind": s.kind, "n_samples": s.n_samples, "thermalization": s.burn_in, "commit_every": s.commit_every}
    theory = REGISTRY[job.theory.name].build(job.theory.couplings, Lattice(job.lattice.shape))
    if hasattr(theory, "measurement_settings"):
        common["measurement"] = theory.measurement_settings()
    return {**common, **sampler_kind(s.kind).attribute(job)}


def storage_settings(job: JobConfig) -> dict[str, Any]:
    """The ``storage`` attribute of the ensemble: how often configurations are kept, and their filter."""
    o = job.output
    level = o.compression_level if o.compression == "gzip" else 0
    return {"save_every": o.save_every, "compression": o.compression, "compression_level": level}
