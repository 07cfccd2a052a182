"""The registry of sampler kinds: each kind's ``[sampler]`` table, its value rules and its ensemble record.

A sampler kind is a :class:`SamplerKind`: a frozen settings dataclass holding only the keys the kind uses
(subclass of :class:`SamplerSettings`, which holds the keys every kind has), the checks on those keys' values,
whether it samples with a trained flow, its default burn-in and the kind-specific part of the ensemble's
``sampler`` attribute. ``load_job`` (:mod:`latflow.jobs.config`) looks the kind up by the name in
``sampler.kind`` and validates the table into its settings class, so a key of another kind is a one-line
error. Adding a sampler is its settings class and one call::

    register_sampler_kind(SamplerKind("smc", SMCSettings, uses_flow=False, ...))

This module imports nothing from :mod:`latflow.jobs.config` at import time (``config`` imports it).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from latflow.fermions.conditional import DEFAULT_DISPERSION

if typing.TYPE_CHECKING:
    from .config import JobConfig

# a check on a value beyond its type: (predicate, what is allowed, completing "must be ...")
Rule = tuple[Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "a positive number")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "a number >= 0")


# --- the settings of each kind: shared groups of keys ---------------------------------


@dataclass(frozen=True)
class SamplerSettings:
    """Keys of every sampler kind.

    Attributes
    ----------
    kind
        The registered sampler kind (:func:`sampler_kind_names`).
    n_samples
        Markov steps per chain recorded in the ensemble.
    thermalization
        Steps per chain discarded before the first recorded row; ``None`` takes the kind's default
        (:attr:`burn_in`).
    commit_every
        Steps per chain between commits to the ensemble file (the unit of a resumable run).
    log_every
        Steps per chain between progress lines.
    """

    kind: str
    n_samples: int = 10000
    thermalization: int | None = None
    commit_every: int = 1000
    log_every: int = 1000

    @property
    def burn_in(self) -> int:
        """``thermalization``, or the kind's default (:attr:`SamplerKind.default_burn_in`)."""
        if self.thermalization is not None:
            return self.thermalization
        return sampler_kind(self.kind).default_burn_in(self)


@dataclass(frozen=True)
class FlowMCMCSettings(SamplerSettings):
    """Flow-MCMC (``kind = "flow-mcmc"``): independence Metropolis with proposals from the trained flow.

    On a theory with fermions it samples the exact effective action (dense determinants: small lattices).
    The default ``thermalization`` is one proposal batch (``batch_size`` steps): the chain starts from an
    importance-resampled proposal.

    Attributes
    ----------
    batch_size
        Proposals drawn per flow call.
    """

    batch_size: int = 256


@dataclass(frozen=True)
class HMCSettings(SamplerSettings):
    """Hybrid Monte Carlo (``kind = "hmc"``), ``n_chains`` chains per process, batched.

    On a theory with fermions it samples the exact effective action (dense determinants: small lattices).
    The default ``thermalization`` is 0 (the ``n_tune`` tuning trajectories are the warm-up), or ``n_tune``
    plain trajectories with ``tune = false``.

    Attributes
    ----------
    n_chains
        Chains per process.
    step_size
        Molecular-dynamics step size (the start of tuning with ``tune = true``).
    n_steps
        Molecular-dynamics steps per trajectory.
    integrator
        ``"omelyan"`` (2nd-order minimum-norm) or ``"leapfrog"``.
    step_jitter
        Relative random variation of the step size per trajectory, in ``[0, 1)``.
    tune
        Tune the step size towards ``target_acceptance`` in ``n_tune`` trajectories before recording.
    n_tune
        Tuning trajectories (without tuning: the default burn-in).
    target_acceptance
        Acceptance rate tuning aims at, in ``(0, 1)``.
    start
        Where the chains begin. ``"default"``: the theory's own start (small random fields ``0.1 N(0, 1)`` for
        real fields and U(1) angles; unit links for SU(N)); ``"cold"``: the classical vacuum (zero fields, unit
        links); ``"hot"``: uniform (Haar) links, standard normal real fields; any other value is a file: an
        ensemble ``.h5`` (its last stored configuration starts every chain) or a configuration file read by
        ``latflow.configio.read_configuration``.
    """

    n_chains: int = 16
    step_size: float = 0.1
    n_steps: int = 10
    integrator: Literal["leapfrog", "omelyan"] = "omelyan"
    step_jitter: float = 0.2
    tune: bool = True
    n_tune: int = 200
    target_acceptance: float = 0.8
    start: str = "default"


@dataclass(frozen=True)
class PseudofermionSettings:
    """Keys of the samplers with Nf = 2 pseudofermions (a mixin; theories with fermions).

    Attributes
    ----------
    even_odd
        Even/odd preconditioning of the Dirac operator (even lattice extents).
    hasenbusch_kappas
        Hasenbusch mass preconditioning: strictly increasing hopping parameters below the theory's ``kappa``,
        one extra pseudofermion each.
    cg_tol
        Relative residual of the conjugate-gradient solves, in ``(0, 1)``.
    cg_max_iter
        Most CG iterations per solve.
    cg_solver
        ``"cg"`` (default): CG in the run's dtype; ``"cg_mixed"``: single-precision inner CG with double-precision
        defect correction to ``cg_tol`` (float64 runs; Wilson pseudofermions).
    cg_check_every
        Iterations between the solver's host-side convergence checks; 0 (default): 1 on the CPU, 10 on GPUs.
    """

    even_odd: bool = False
    hasenbusch_kappas: tuple[float, ...] = ()
    cg_tol: float = 1e-10
    cg_max_iter: int = 10000
    cg_solver: Literal["cg", "cg_mixed"] = "cg"
    cg_check_every: int = 0


@dataclass(frozen=True)
class PseudofermionHMCSettings(PseudofermionSettings, HMCSettings):
    """HMC with Nf = 2 pseudofermions (``kind = "pf-hmc"``): the :class:`HMCSettings` keys plus the
    :class:`PseudofermionSettings` keys, and:

    Attributes
    ----------
    time_scales
        Multipliers of the nested (Sexton-Weingarten) integrator; ``[]`` (default) one time scale. ``[m_0, ...]``:
        the gauge force on level 0 (finest), the pseudofermion factors on levels 1 .. ``len``, the heaviest on
        level 1 and the Hasenbusch ratios on the coarsest; ``n_steps`` steps of the coarsest level, ``m_j``
        level-``j`` steps per drift segment of a level-``j+1`` step (:class:`latflow.samplers.PseudofermionHMC`).
        At most one entry per pseudofermion factor (``1 + len(hasenbusch_kappas)``).
    chrono
        Chronological initial guesses for the force solves: 0 (default) zero guesses; ``k >= 1`` the
        minimal-residual extrapolation of the last ``k`` solutions of the same factor (MD then reversible only
        to ``cg_tol``; the Metropolis step stays exact).
    """

    time_scales: tuple[int, ...] = ()
    chrono: int = 0


@dataclass(frozen=True)
class ConditionalSettings:
    """Keys of the conditional that proposes the pseudofermions given the links (a mixin).

    Attributes
    ----------
    conditional
        ``"triangular"``: gauge-covariant triangular maps (Wilson fermions); ``"free"``: the free staggered
        operator at a learnable mass with site scales (the Yukawa theory,
        :class:`~latflow.fermions.staggered_conditional.FreeStaggeredConditional`); ``"exact"``: the dense heatbath
        (volumes up to 256 sites); ``"scalar"``: a scaled Gaussian; ``"auto"`` (default): ``"free"`` for
        theories with staggered pseudofermions (:data:`STAGGERED_THEORIES`), else ``"triangular"``.
    conditional_dispersion
        Widens the conditional, ``M -> dispersion M``, in ``[0.5, 4]``; the default 1.1 is the validated one
        (:data:`latflow.fermions.conditional.DEFAULT_DISPERSION`).
    conditional_nested
        Full lattice: nested triangular Schur complement.
    """

    conditional: Literal["auto", "triangular", "exact", "scalar", "free"] = "auto"
    conditional_dispersion: float = DEFAULT_DISPERSION
    conditional_nested: bool = True

    def resolved_conditional(self, theory_name: str) -> str:
        """The conditional a job on ``theory_name`` uses (``"auto"`` resolved)."""
        if self.conditional != "auto":
            return self.conditional
        return "free" if theory_name in STAGGERED_THEORIES else "triangular"

    @staticmethod
    def allowed_conditionals(theory_name: str) -> tuple[str, ...]:
        """The conditionals a theory's pseudofermions admit."""
        if theory_name in STAGGERED_THEORIES:
            return ("auto", "free", "exact", "scalar")
        return ("auto", "triangular", "exact", "scalar")


# theories whose pseudofermion is staggered on a scalar background (conditionals "free", "exact", "scalar";
# no even/odd or Hasenbusch factors)
STAGGERED_THEORIES: tuple[str, ...] = ("yukawa",)


@dataclass(frozen=True)
class PseudofermionFlowMCMCSettings(ConditionalSettings, PseudofermionSettings, FlowMCMCSettings):
    """Flow-MCMC in the joint space of links and pseudofermions (``kind = "pf-flow-mcmc"``).

    A gauge-covariant conditional proposes the pseudofermions (CG solves, no determinants); the flow is
    trained on the gauge action. The :class:`FlowMCMCSettings`, :class:`PseudofermionSettings` and
    :class:`ConditionalSettings` keys.
    """


# --- value rules of the key groups (keys without the "sampler." prefix) -----------------

COMMON_RULES: dict[str, Rule] = {
    "n_samples": POSITIVE,
    "thermalization": NON_NEGATIVE,
    "commit_every": POSITIVE,
    "log_every": POSITIVE,
}
FLOW_RULES: dict[str, Rule] = {"batch_size": POSITIVE}
HMC_RULES: dict[str, Rule] = {
    "n_chains": POSITIVE,
    "step_size": POSITIVE,
    "n_steps": POSITIVE,
    "step_jitter": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "n_tune": NON_NEGATIVE,
    "target_acceptance": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "start": (lambda v: v.strip() != "", "'default', 'cold', 'hot' or a configuration or ensemble file"),
}
PSEUDOFERMION_RULES: dict[str, Rule] = {
    "hasenbusch_kappas": (
        lambda v: all(0 < k < 0.5 for k in v) and all(a < b for a, b in zip(v, v[1:])),
        "a strictly increasing list of numbers in (0, 0.5)",
    ),
    "cg_tol": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "cg_max_iter": POSITIVE,
    "cg_check_every": NON_NEGATIVE,
}
PF_HMC_RULES: dict[str, Rule] = {
    "time_scales": (lambda v: all(m >= 1 for m in v), "a list of integers >= 1 (default [] = one time scale)"),
    "chrono": (lambda v: v >= 0, "an integer >= 0 (0: zero initial guesses)"),
}
CONDITIONAL_RULES: dict[str, Rule] = {
    "conditional_dispersion": (lambda v: 0.5 <= v <= 4, "a number in [0.5, 4] (1.1 is the validated default)"),
}


# --- the registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerKind:
    """A sampler kind as job files name it.

    Attributes
    ----------
    name
        The value of ``sampler.kind``.
    settings
        Frozen dataclass of the kind's ``[sampler]`` table, a subclass of :class:`SamplerSettings` (so it has
        ``kind``, ``n_samples``, ``thermalization``, ``commit_every`` and ``log_every``).
    uses_flow
        Whether the kind samples with a trained flow, or ``settings -> bool`` where a key decides it
        (``latflow train`` applies, ``[model]`` and ``[train]``
        are checked, the checkpoint is needed).
    default_burn_in
        ``settings -> int``: the steps per chain discarded when ``thermalization`` is not given.
    attribute
        ``(job) -> dict``: the kind's settings in the ensemble's ``sampler`` attribute, after the common
        ``kind``, ``n_samples``, ``thermalization`` (the burn-in), ``commit_every`` (and the theory's
        ``measurement``) that :func:`latflow.jobs.config.sampler_settings` writes. Resuming compares this
        record, so it must not change for a kind once ensembles exist.
    rules
        Checks on values beyond their type, by key (no ``sampler.`` prefix).
    """

    name: str
    settings: type[SamplerSettings]
    uses_flow: bool | Callable[[Any], bool]
    default_burn_in: Callable[[Any], int]
    attribute: Callable[[JobConfig], dict[str, Any]]
    rules: Mapping[str, Rule] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the kind's ``[sampler]`` table, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self.settings))

    @property
    def pseudofermions(self) -> bool:
        """Whether the kind samples Nf = 2 pseudofermions (has the :class:`PseudofermionSettings` keys)."""
        return issubclass(self.settings, PseudofermionSettings)


SAMPLER_KINDS: dict[str, SamplerKind] = {}


def register_sampler_kind(kind: SamplerKind, *, replace: bool = False) -> SamplerKind:
    """Add ``kind`` to the registry (``replace=True`` to redefine a name); returns it.

    Raises
    ------
    ValueError
        The name is taken, the settings class is not a frozen :class:`SamplerSettings` dataclass, or a rule
        names a key the settings class does not have.
    """
    if kind.name in SAMPLER_KINDS and not replace:
        raise ValueError(f"sampler kind {kind.name!r} is already registered")
    settings = kind.settings
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, SamplerSettings)):
        raise ValueError(f"sampler kind {kind.name!r}: settings must be a dataclass subclassing SamplerSettings")
    if not settings.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise ValueError(f"sampler kind {kind.name!r}: settings {settings.__name__} must be frozen")
    stray = sorted(set(kind.rules) - set(kind.keys))
    if stray:
        raise ValueError(f"sampler kind {kind.name!r}: rule for {stray[0]!r}, which is not a key of its settings")
    SAMPLER_KINDS[kind.name] = dataclasses.replace(kind, rules=MappingProxyType(dict(kind.rules)))
    return SAMPLER_KINDS[kind.name]


def sampler_kind(name: str) -> SamplerKind:
    """The registered kind ``name``; ``KeyError`` lists the registered kinds."""
    try:
        return SAMPLER_KINDS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown sampler kind {name!r}; known: {', '.join(sampler_kind_names())}") from None


def sampler_kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(SAMPLER_KINDS)


def kinds_with_key(key: str) -> tuple[str, ...]:
    """The registered kinds whose ``[sampler]`` table has ``key`` (e.g. ``"start"``: the HMC kinds)."""
    return tuple(name for name, kind in SAMPLER_KINDS.items() if key in kind.keys)


# --- the built-in kinds ---------------------------------------------------------------


def _flow_burn_in(s: FlowMCMCSettings) -> int:
    # one proposal batch after the importance-resampled start
    return s.batch_size


def _hmc_burn_in(s: HMCSettings) -> int:
    # the n_tune tuning trajectories are the warm-up; without tuning, as many plain ones
    return 0 if (s.tune and s.n_tune) else s.n_tune


def _pseudofermion_attribute(s: PseudofermionSettings) -> dict[str, Any]:
    return {
        "even_odd": s.even_odd,
        "hasenbusch_kappas": list(s.hasenbusch_kappas),
        "cg_tol": s.cg_tol,
        "cg_max_iter": s.cg_max_iter,
    }


def _flow_attribute(job: JobConfig) -> dict[str, Any]:
    s = job.sampler
    assert isinstance(s, FlowMCMCSettings)
    return {"batch_size": s.batch_size, "model": dataclasses.asdict(job.model), "dtype": job.run.dtype}


def _pf_flow_attribute(job: JobConfig) -> dict[str, Any]:
    s = job.sampler
    assert isinstance(s, PseudofermionFlowMCMCSettings)
    conditional = {
        "conditional": s.resolved_conditional(job.theory.name),
        "conditional_dispersion": s.conditional_dispersion,
        "conditional_nested": s.conditional_nested,
    }
    return {**_flow_attribute(job), **_pseudofermion_attribute(s), **conditional}


def _hmc_attribute(job: JobConfig) -> dict[str, Any]:
    s = job.sampler
    assert isinstance(s, HMCSettings)
    return {
        "n_chains": s.n_chains,
        "step_size": s.step_size,
        "n_steps": s.n_steps,
        "integrator": s.integrator,
        "step_jitter": s.step_jitter,
        "tune": s.tune,
        "n_tune": s.n_tune,
        "target_acceptance": s.target_acceptance,
        "dtype": job.run.dtype,
        **(_pseudofermion_attribute(s) if isinstance(s, PseudofermionSettings) else {}),
        # recorded only when chosen, so that ensembles from before these keys still resume
        **({"time_scales": list(s.time_scales)} if getattr(s, "time_scales", ()) else {}),
        **({"chrono": s.chrono} if getattr(s, "chrono", 0) else {}),
        # recorded only when chosen, so that ensembles from before the key still resume
        **({"start": s.start} if s.start != "default" else {}),
    }


register_sampler_kind(
    SamplerKind(
        "flow-mcmc",
        FlowMCMCSettings,
        uses_flow=True,
        default_burn_in=_flow_burn_in,
        attribute=_flow_attribute,
        rules={**COMMON_RULES, **FLOW_RULES},
    )
)
register_sampler_kind(
    SamplerKind(
        "hmc",
        HMCSettings,
        uses_flow=False,
        default_burn_in=_hmc_burn_in,
        attribute=_hmc_attribute,
        rules={**COMMON_RULES, **HMC_RULES},
    )
)
register_sampler_kind(
    SamplerKind(
        "pf-hmc",
        PseudofermionHMCSettings,
        uses_flow=False,
        default_burn_in=_hmc_burn_in,
        attribute=_hmc_attribute,
        rules={**COMMON_RULES, **HMC_RULES, **PSEUDOFERMION_RULES, **PF_HMC_RULES},
    )
)
register_sampler_kind(
    SamplerKind(
        "pf-flow-mcmc",
        PseudofermionFlowMCMCSettings,
        uses_flow=True,
        default_burn_in=_flow_burn_in,
        attribute=_pf_flow_attribute,
        rules={**COMMON_RULES, **FLOW_RULES, **PSEUDOFERMION_RULES, **CONDITIONAL_RULES},
    )
)
