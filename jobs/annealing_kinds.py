"""The annealing sampler kinds of job files: ``smc``, ``ais``, ``aft``, ``craft`` and ``pimh``.

Each kind's ``[sampler]`` table is a frozen dataclass below, registered with
:func:`latflow.jobs.sampler_kinds.register_sampler_kind`; :mod:`latflow.jobs.annealing` wires them to the
engine (:mod:`latflow.samplers.annealing`). For the weighted kinds (all but ``pimh``) an ensemble *run* is one
independent annealing pass of ``n_particles`` particles: ``n_samples`` counts runs, ``commit_every`` is the number
of runs batched in one pass and committed together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .sampler_kinds import (
    COMMON_RULES,
    NON_NEGATIVE,
    POSITIVE,
    Rule,
    SamplerKind,
    SamplerSettings,
    register_sampler_kind,
)

if TYPE_CHECKING:
    from .config import JobConfig

UNIT_OPEN: Rule = (lambda v: 0 < v < 1, "a number in (0, 1)")
SCHEDULE_FIXED: Rule = (lambda v: v == "power", "'power' (flows belong to fixed transitions)")
RUNS_ONLY: Rule = (lambda v: v == "runs", "'runs' (spreading particles over ranks is for smc, ais and craft)")


@dataclass(frozen=True)
class AnnealingSettings(SamplerSettings):
    """Keys of every annealing kind: the path, the schedule and the Markov kernel.

    Attributes
    ----------
    n_samples
        Weighted kinds: independent runs written (each a "chain" of the ensemble); ``pimh``: Markov steps per chain.
    commit_every
        Weighted kinds: runs batched in one pass and committed together; ``pimh``: steps per commit.
    thermalization
        Weighted kinds: must be 0 (every run starts from exact draws); ``pimh``: steps discarded (default 10).
    n_particles
        Particles per run.
    path
        ``"geometric"``: ``log gamma_t = (1 - t) log r + t log p`` from the prior ``r`` of ``[model]`` (Gaussian for
        real fields with ``model.prior_sigma``, Haar links, or the plaquette prior) to the target; ``"coupling"``: the
        target with ``coupling`` moved linearly from ``coupling_start`` (where the theory must have an exact sampler
        and an exact ``log Z``, e.g. ``beta = 0`` for gauge theories, ``kappa = 0`` for the Schwinger model, ``lam = 0``
        for phi^4) to its value in ``[theory]``.
    coupling, coupling_start
        The coupling annealed along ``path = "coupling"`` and its start value.
    schedule
        ``"power"``: ``t_k = (k / K)^schedule_power`` (``K = n_transitions``; power 1 is linear, 2 gives
        ``beta ~ s^2``); ``"adaptive"``: each step keeps the conditional ESS fraction at ``target_cess``.
    n_transitions, schedule_power, target_cess
        Of the schedule.
    kernel
        Markov kernel at every temperature: ``"hmc"`` (``n_trajectories`` trajectories of ``n_steps`` integrator
        steps), ``"rwm"`` (``n_steps`` random-walk Metropolis sweeps of the whole field) or ``"none"``.
    step_size
        Kernel step size: one number, or values at evenly spaced annealing times (piecewise linear in ``t``).
    n_steps, n_trajectories, integrator
        Of the kernel.
    step_jitter
        HMC: each trajectory's step size is drawn in ``step_size [1 - step_jitter, 1 + step_jitter]`` (fixed-length
        trajectories leave some modes of a free field unmoved, so resampled copies would never spread out).
    """

    n_samples: int = 16
    commit_every: int = 8
    log_every: int = 8
    n_particles: int = 256
    path: Literal["geometric", "coupling"] = "geometric"
    coupling: str = "beta"
    coupling_start: float = 0.0
    schedule: Literal["power", "adaptive"] = "power"
    n_transitions: int = 100
    schedule_power: float = 1.0
    target_cess: float = 0.95
    kernel: Literal["hmc", "rwm", "none"] = "hmc"
    step_size: float | tuple[float, ...] = 0.1
    n_steps: int = 5
    n_trajectories: int = 1
    integrator: Literal["leapfrog", "omelyan"] = "omelyan"
    step_jitter: float = 0.2


@dataclass(frozen=True)
class ResamplingSettings:
    """Resampling keys (a mixin).

    Attributes
    ----------
    resample_threshold
        Resample a run's population when its ESS fraction falls below this, in ``[0, 1]``.
    resampling
        ``"systematic"`` or ``"multinomial"``.
    """

    resample_threshold: float = 0.5
    resampling: Literal["systematic", "multinomial"] = "systematic"


@dataclass(frozen=True)
class ParallelSettings:
    """How the runs of a weighted kind use several MPI ranks (a mixin).

    Attributes
    ----------
    parallel
        ``"runs"``: every rank anneals its own independent runs (no communication; the default, and the best use
        of many ranks when one run fits one process). ``"particles"``: every run's ``n_particles`` are spread over
        all ranks, with global weights, ESS, resampling and ``log Z`` (for populations too large for one process,
        or to finish a run sooner); it needs ``n_particles`` >= the number of ranks. ``smc``, ``ais`` and
        ``craft`` only (CRAFT *training* always spreads its particles over the ranks).
    """

    parallel: Literal["runs", "particles"] = "runs"


@dataclass(frozen=True)
class AISSettings(ParallelSettings, AnnealingSettings):
    """Annealed importance sampling (``kind = "ais"``): the annealing keys, no resampling."""


@dataclass(frozen=True)
class SMCSettings(ParallelSettings, ResamplingSettings, AnnealingSettings):
    """Annealed SMC (``kind = "smc"``): the annealing and resampling keys."""


@dataclass(frozen=True)
class AFTSettings(SMCSettings):
    """Annealed flow transport (``kind = "aft"``): SMC with a flow per transition fitted on a separate training
    population (``n_opt_steps`` Adam steps at ``lr``); the flow architecture is ``[model]``.

    Attributes
    ----------
    n_opt_steps
        Adam steps per transition.
    lr
        Adam learning rate.
    """

    resample_threshold: float = 0.3
    n_opt_steps: int = 20
    lr: float = 1e-3


@dataclass(frozen=True)
class CRAFTSettings(SMCSettings):
    """CRAFT (``kind = "craft"``): SMC with a flow per transition (architecture ``[model]``), trained by
    ``n_iterations`` CRAFT iterations of ``train_particles`` particles (``latflow train``; checkpoint at
    ``output.model``), then ``n_samples`` runs with the frozen flows.

    Attributes
    ----------
    n_iterations
        CRAFT training iterations (each a full SMC pass with one Adam step per flow).
    train_particles
        Particles per training iteration (0: ``n_particles``).
    lr
        Adam learning rate.
    grad_clip
        Gradient-norm clip per transition (0: none).
    """

    resample_threshold: float = 0.3
    n_iterations: int = 200
    train_particles: int = 0
    lr: float = 1e-3
    grad_clip: float = 0.0

    def transport_signature(self) -> dict[str, Any]:
        """What a CRAFT checkpoint must match beyond ``[model]``: the transitions the flows belong to."""
        return {"craft": {"n_transitions": self.n_transitions, "schedule_power": self.schedule_power}}


@dataclass(frozen=True)
class PIMHSettings(CRAFTSettings):
    """Particle independent Metropolis-Hastings (``kind = "pimh"``): an exact Markov chain whose every step is a
    fresh SMC run (``proposal = "smc"``) or a CRAFT run with trained flows (``proposal = "craft"``, trained as for
    ``craft``), accepted with probability ``min(1, Z_new / Z_old)``; it records one particle per step and chain.

    Attributes
    ----------
    proposal
        ``"smc"`` or ``"craft"``.
    n_chains
        Chains per process (each step runs one SMC population per chain, batched).
    """

    n_samples: int = 1000
    commit_every: int = 100
    log_every: int = 100
    thermalization: int | None = None
    proposal: Literal["smc", "craft"] = "smc"
    n_chains: int = 4


@dataclass(frozen=True)
class SNFSettings(AnnealingSettings):
    """Stochastic normalising flow (``kind = "snf"``; Wu, Köhler, Noé 2020): ``n_transitions`` blocks of a flow
    (architecture ``[model]``) followed by a stochastic layer at the block's annealing temperature, trained end to
    end by ``[train]`` (``steps``, ``batch_size``, ``lr``, ``checkpoint_every``) on the path's reverse KL, then
    ``n_samples`` weighted runs.

    Attributes
    ----------
    kernel
        The stochastic layer: ``"rwm"`` (``n_steps`` random-walk Metropolis sweeps, any field; the accept decision
        is held fixed in the gradient), ``"langevin"`` (``n_steps`` unadjusted Langevin steps with the weights of
        the Gaussian transition densities; real fields) or ``"hmc"`` (exact weights, no gradient through it).
    """

    kernel: Literal["rwm", "langevin", "hmc"] = "rwm"
    n_steps: int = 1

    def transport_signature(self) -> dict[str, Any]:
        """What an SNF checkpoint must match beyond ``[model]``: its blocks."""
        return {"snf": {"n_transitions": self.n_transitions, "schedule_power": self.schedule_power}}


ANNEALING_RULES: dict[str, Rule] = {
    **COMMON_RULES,
    "n_particles": POSITIVE,
    "coupling": (lambda v: v.strip() != "", "the name of one of the theory's couplings"),
    "n_transitions": POSITIVE,
    "schedule_power": POSITIVE,
    "target_cess": UNIT_OPEN,
    "step_size": (
        lambda v: v > 0 if isinstance(v, float) else (len(v) > 0 and all(x > 0 for x in v)),
        "a positive number or a list of positive numbers",
    ),
    "n_steps": POSITIVE,
    "n_trajectories": POSITIVE,
    "step_jitter": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}
WEIGHTED_RULES: dict[str, Rule] = {
    **ANNEALING_RULES,
    "thermalization": ((lambda v: v == 0), "0 (every run starts from exact draws; omit the key)"),
}
RESAMPLING_RULES: dict[str, Rule] = {"resample_threshold": ((lambda v: 0 <= v <= 1), "a number in [0, 1]")}
FLOW_RULES: dict[str, Rule] = {"lr": POSITIVE}
CRAFT_RULES: dict[str, Rule] = {
    **FLOW_RULES,
    "n_iterations": POSITIVE,
    "train_particles": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE,
    "schedule": SCHEDULE_FIXED,
}


def _attribute(job: JobConfig) -> dict[str, Any]:
    """Every key of the kind's table beyond the common ones, the model for flow kinds, and the dtype."""
    s = job.sampler
    common = {f.name for f in dataclasses.fields(SamplerSettings)}
    out = {k: v for k, v in dataclasses.asdict(s).items() if k not in common}
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
    if out.get("parallel") == "runs":  # the default, absent from the records of ensembles written before the key
        del out["parallel"]
    flows = isinstance(s, (AFTSettings, CRAFTSettings, SNFSettings))
    if flows and not (isinstance(s, PIMHSettings) and s.proposal == "smc"):
        out["model"] = dataclasses.asdict(job.model)
    out["dtype"] = job.run.dtype
    return out


def _no_burn_in(s: Any) -> int:
    return 0


def _pimh_burn_in(s: Any) -> int:
    return 10


def trains_snf(settings: Any) -> bool:
    """Whether ``latflow train`` trains a stochastic normalising flow for this job."""
    return isinstance(settings, SNFSettings)


def is_weighted(settings: Any) -> bool:
    """Whether a kind's output is a weighted population (annealing runs) rather than Markov chains."""
    return isinstance(settings, AnnealingSettings) and not isinstance(settings, PIMHSettings)


def trains_craft(settings: Any) -> bool:
    """Whether ``latflow train`` runs CRAFT iterations for this job."""
    if isinstance(settings, PIMHSettings):
        return settings.proposal == "craft"
    return isinstance(settings, CRAFTSettings)


register_sampler_kind(
    SamplerKind("smc", SMCSettings, False, _no_burn_in, _attribute, {**WEIGHTED_RULES, **RESAMPLING_RULES})
)
register_sampler_kind(SamplerKind("ais", AISSettings, False, _no_burn_in, _attribute, WEIGHTED_RULES))
register_sampler_kind(
    SamplerKind(
        "aft",
        AFTSettings,
        False,
        _no_burn_in,
        _attribute,
        {
            **WEIGHTED_RULES,
            **RESAMPLING_RULES,
            **FLOW_RULES,
            "n_opt_steps": NON_NEGATIVE,
            "schedule": SCHEDULE_FIXED,
            "parallel": RUNS_ONLY,
        },  # fmt: skip
    )
)
register_sampler_kind(
    SamplerKind(
        "craft", CRAFTSettings, True, _no_burn_in, _attribute, {**WEIGHTED_RULES, **RESAMPLING_RULES, **CRAFT_RULES}
    )
)
register_sampler_kind(
    SamplerKind("snf", SNFSettings, True, _no_burn_in, _attribute, {**WEIGHTED_RULES, "schedule": SCHEDULE_FIXED})
)
register_sampler_kind(
    SamplerKind(
        "pimh",
        PIMHSettings,
        trains_craft,
        _pimh_burn_in,
        _attribute,
        {**ANNEALING_RULES, **RESAMPLING_RULES, **CRAFT_RULES, "n_chains": POSITIVE, "parallel": RUNS_ONLY},
    )
)
