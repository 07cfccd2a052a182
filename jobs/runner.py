"""Wires a validated job to the engine: theory + model + trainer/sampler + ensemble writer.

Only this module (with :mod:`latflow.jobs.cli`) reads configuration; everything
it calls takes tensors, numbers and objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latflow import checkpoint
from latflow.analysis import DerivedObservable, analyze_ensemble, sector_check
from latflow.ensemble import EnsembleError, EnsembleMeta, EnsembleReader, EnsembleWriter
from latflow.ensemble._format import FIELD_INDEX
from latflow.fermions.conditional import (
    FINITE_VARIANCE_LAMBDA,
    ConditionalPseudofermions,
    ExactConditional,
    ScalarConditional,
    TriangularConditional,
    dispersion_for,
    smallest_covariance_ratio,
)
from latflow.fermions.staggered_conditional import (
    ExactStaggeredConditional,
    FreeStaggeredConditional,
    ScalarStaggeredConditional,
    StaggeredConditional,
    default_free_mass,
    smallest_staggered_covariance_ratio,
)
from latflow.fermions.training_target import training_action
from latflow.flows import FlowModel, make_affine_flow, model_sha256
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.flows.sun_layers import make_sun_spectral_flow
from latflow.lattice import Lattice
from latflow.manifolds import SUN, U1Angles
from latflow.mpi import SerialComm, check_distinct_gpus, gpu_for_rank
from latflow.mpi_blocks import BlockPipe
from latflow.plaquette_prior import U1PlaquettePrior
from latflow.rng import make_generator, stream_seed
from latflow.samplers import HMC, FlowMCMC, PseudofermionFlowMCMC, PseudofermionHMC, state_from_bytes, state_to_bytes
from latflow.theories import get_spec
from latflow.training import ReverseKLTrainer, TrainingDivergedError

from . import annealing, annealing_kinds, termination
from .config import (
    START_KEYWORDS,
    JobConfig,
    JobError,
    chain_start,
    field_manifold,
    sampler_settings,
    storage_settings,
    to_dict,
)
from .progress import Progress
from .sampler_kinds import STAGGERED_THEORIES, ConditionalSettings, PseudofermionSettings
from .termination import Terminated

log = logging.getLogger("latflow")

# independent random streams of one seed: (seed, purpose, rank)
STREAM_TRAIN, STREAM_SAMPLE, STREAM_INIT = 0, 1, 2
STREAM_CHECK = 3  # the flow configurations of the pf-flow-mcmc weight check and the sector check
SECTOR_CHECK_PROPOSALS, SECTOR_CHECK_BATCH = 4096, 512


def torch_dtype(job: JobConfig) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[job.run.dtype]


def rank_device(job: JobConfig, comm: SerialComm) -> torch.device:
    """``cpu``, or this rank's GPU: one rank per GPU, ``cuda:<local rank>`` (``cuda:0`` when each rank sees one).

    Collective under MPI (the ranks of a node compare their GPUs). ``JobError`` (one line) if CUDA is absent,
    if a node has fewer visible GPUs than ranks, or if two ranks of a node would share one GPU.
    """
    if job.run.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise JobError(f"{job.source}: 'run.device' = 'cuda' but no CUDA device is available; use 'cpu'")
    where = f"{job.source}: 'run.device' = 'cuda' on rank {comm.rank}"
    try:
        index = gpu_for_rank(
            comm.local_rank, comm.local_size, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
        uuids = comm.node_allgather(uuid)
        if all(uuids):  # a torch build without device UUIDs: the check is skipped
            check_distinct_gpus(uuids)
    except ValueError as exc:
        raise JobError(f"{where}: {exc}") from None
    torch.cuda.set_device(index)  # NCCL (run.comm = 'torch') and default CUDA allocations use this rank's GPU
    return torch.device("cuda", index)


def build_theory(job: JobConfig) -> Any:
    spec = get_spec(job.theory.name)
    return spec.build(job.theory.couplings, Lattice(job.lattice.shape))


def build_model(job: JobConfig, device: torch.device) -> FlowModel:
    """The job's flow, initialised reproducibly from ``run.seed`` (same on every rank)."""
    m = job.model
    lattice = Lattice(job.lattice.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(job.run.seed, STREAM_INIT))
        if m.kind == "affine":
            model = make_affine_flow(lattice, m.n_layers, m.hidden, m.kernel_size, m.prior_sigma, dtype=torch.float64)
        elif m.kind == "sun-spectral":
            return _build_sun_spectral(job, lattice, device)
        else:
            prior = None
            if m.prior == "plaquette":
                beta = m.prior_beta if m.prior_beta is not None else float(job.theory.couplings.beta)
                prior = U1PlaquettePrior(lattice, beta)
            model = make_u1_equivariant_flow(
                lattice,
                m.n_layers,
                m.inner,
                m.hidden,
                m.kernel_size,
                n_mix=m.n_mix,
                n_bins=m.n_bins,
                prior=prior,
                zero_init=prior is not None,  # on a structure-aware prior the couplings start as the identity
                dtype=torch.float64,
            )
    return model.to(device=device, dtype=torch_dtype(job))


def _build_sun_spectral(job: JobConfig, lattice: Lattice, device: torch.device) -> FlowModel:
    """``model.kind = 'sun-spectral'`` in the run's precision (complex links of its real dtype), on ``device``."""
    m, n = job.model, int(job.theory.couplings.n)
    dtype = torch_dtype(job)
    prior = None
    if m.prior == "plaquette":
        from latflow.sun_plaquette_prior import SUNPlaquettePrior

        beta = m.prior_beta if m.prior_beta is not None else float(job.theory.couplings.beta)
        prior = SUNPlaquettePrior(lattice, beta, n, dtype=dtype.to_complex(), device=device)
    return make_sun_spectral_flow(
        lattice,
        n,
        m.n_layers,
        m.hidden,
        m.kernel_size,
        n_bins=m.n_bins,
        prior=prior,
        zero_init=prior is not None,  # on a structure-aware prior the couplings start as the identity
        dtype=dtype,
        device=device,
    )


def _model_signature(job: JobConfig) -> str:
    """What a checkpoint must match: the model keys (the plaquette prior's beta resolved; the default
    Haar prior leaves no trace, so checkpoints from before the prior keys stay valid), lattice and dtype."""
    model = dataclasses.asdict(job.model)
    if model["prior"] == "haar":
        del model["prior"], model["prior_beta"]
    elif model["prior_beta"] is None:
        model["prior_beta"] = float(job.theory.couplings.beta)
    extra = getattr(job.sampler, "transport_signature", None)  # CRAFT: the transitions its flows belong to
    extra = extra() if callable(extra) else {}
    signature = {"model": model, "lattice": list(job.lattice.shape), "dtype": job.run.dtype, **extra}
    return json.dumps(signature, sort_keys=True)


def preflight(job: JobConfig, command: str, *, resume: bool, force: bool) -> None:
    """Refuse, before anything is touched or logged, what would fail or overwrite files unasked.

    Every refusal is a one-line :class:`JobError` that names the job file (or the file at
    fault) and the key; it runs before the job is logged so that the error is all the user sees.
    """
    if resume and force:
        raise JobError("--resume and --force exclude each other")
    src = job.source
    ens = Path(job.output.path)
    model = job.output.model_path
    model_key = "output.model" if job.output.model else "output.path"
    if command == "train" and not job.uses_flow:
        raise JobError(
            f"{src}: 'sampler.kind' = {job.sampler.kind!r} has no flow to train; use 'latflow sample' or 'latflow run'"
        )
    # folders first: a missing folder explains a missing model better than "no trained model"
    paths = [("output.path", ens)] + ([(model_key, model)] if job.uses_flow else [])
    for key, p in paths:
        if not p.parent.is_dir():
            what = "does not exist" if not p.parent.exists() else "is not a folder"
            raise JobError(f"{src}: '{key}' = '{p}': folder {p.parent} {what}")
        if p.is_dir():
            raise JobError(f"{src}: '{key}' = '{p}' is a folder; name a file")
    if command in ("sample", "run") and ens.exists() and not (resume or force):
        raise JobError(f"{ens}: ensemble exists; use --resume to append or --force to replace it")
    if command in ("train", "run") and job.uses_flow and model.exists() and not (resume or force):
        raise JobError(f"{model}: model checkpoint exists; use --resume to continue or --force to retrain")
    # --force replaces only what latflow wrote: never a notes file, a foreign HDF5 file, ...
    if force and command in ("sample", "run") and ens.exists():
        _require_ensemble(ens)
    if force and command in ("train", "run") and job.uses_flow and model.exists():
        _require_model_checkpoint(model)
    # --resume continues something: with nothing there, a fresh chain would pass for a continued one
    if resume:
        _require_something_to_resume(job, command, ens, model)
    if command == "sample" and job.uses_flow and not model.exists():
        raise JobError(
            f"{model}: no trained model; train it first ('latflow run' trains and samples) with: "
            f"{command_line(job, 'train')}"
        )
    if job.run.device == "cuda" and not torch.cuda.is_available():
        raise JobError(f"{src}: 'run.device' = 'cuda' but no CUDA device is available; allowed here: 'cpu'")
    if job.uses_flow and model.exists() and (command == "sample" or (resume and command in ("train", "run"))):
        read_checkpoint(job, model)
    if resume and command in ("sample", "run") and ens.exists():
        _check_resumable(ens, _meta(job, build_theory(job), None), check_model=False)
    if getattr(job.sampler, "path", None) == "coupling":  # an annealing start without an exact sampler fails here
        annealing.coupling_path(job, build_theory(job), torch.device("cpu"))
    if command in ("sample", "run") and chain_start(job.sampler) not in START_KEYWORDS:
        read_start(job, build_theory(job))  # a wrong start file fails before anything is written
    _check_pseudofermion_options(job)


def _check_pseudofermion_options(job: JobConfig) -> None:
    """The conditional and pseudofermion factors the theory admits (staggered: no even/odd, Hasenbusch, triangular)."""
    s, src, name = job.sampler, job.source, job.theory.name
    if isinstance(s, ConditionalSettings) and s.conditional not in s.allowed_conditionals(name):
        allowed = ", ".join(repr(c) for c in s.allowed_conditionals(name))
        raise JobError(
            f"{src}: 'sampler.conditional' = {s.conditional!r} is not available for theory '{name}'; allowed: {allowed}"
        )
    if name in STAGGERED_THEORIES and isinstance(s, PseudofermionSettings):
        if s.even_odd:
            raise JobError(
                f"{src}: 'sampler.even_odd' = true: theory '{name}' has staggered pseudofermions with a site-dependent "
                "mass (even and odd sites coupled); allowed: even_odd = false"
            )
        if s.hasenbusch_kappas:
            raise JobError(
                f"{src}: 'sampler.hasenbusch_kappas' = {list(s.hasenbusch_kappas)}: theory '{name}' has no hopping "
                "parameter to split; allowed: hasenbusch_kappas = []"
            )
        if getattr(s, "chrono", 0):
            raise JobError(
                f"{src}: 'sampler.chrono' = {s.chrono}: theory '{name}' has no chronological guesses; allowed: 0"
            )
        if s.cg_solver != "cg":
            raise JobError(
                f"{src}: 'sampler.cg_solver' = {s.cg_solver!r}: theory '{name}' solves its staggered systems with "
                "plain CG; allowed: 'cg'"
            )
    scales = tuple(getattr(s, "time_scales", ()))
    n_factors = 1 + len(s.hasenbusch_kappas) if isinstance(s, PseudofermionSettings) else 1
    if len(scales) > n_factors:
        raise JobError(
            f"{src}: 'sampler.time_scales' = {list(scales)}: {n_factors} pseudofermion factor(s) (1 + "
            f"len(hasenbusch_kappas)) allow at most {n_factors} multiplier(s)"
        )


def command_line(job: JobConfig, command: str) -> str:
    """``latflow COMMAND JOB`` with the user's ``--set``/``--out``/``--device`` changes, shell-quoted."""
    parts = ["latflow", command, shlex.quote(job.source)]
    for change in job.overrides:
        option, _, value = change.partition(" ")
        parts += [option, shlex.quote(value)]
    return " ".join(parts)


def _require_ensemble(path: Path) -> None:
    """``JobError`` unless ``path`` is a latflow ensemble (what ``--force`` may replace)."""
    try:
        with EnsembleReader(path):
            pass
    except EnsembleError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise JobError(
            f"{path}: not a latflow ensemble ({reason}); --force replaces only ensembles that latflow wrote: "
            "choose another output path or move the file away"
        ) from None


def _require_model_checkpoint(path: Path) -> None:
    """``JobError`` unless ``path`` is a latflow model checkpoint (what ``--force`` may replace)."""
    try:
        state = checkpoint.load(path)
        ok = isinstance(state, dict) and isinstance(state.get("model"), dict) and "signature" in state
    except Exception:  # torch raises many kinds on a file that is not a checkpoint
        ok = False
    if not ok:
        raise JobError(
            f"{path}: not a latflow model checkpoint; --force replaces only checkpoints that latflow wrote: "
            "choose another 'output.model' or move the file away"
        )


def _require_something_to_resume(job: JobConfig, command: str, ens: Path, model: Path) -> None:
    fresh = "run without --resume to start"
    if command == "sample" and not ens.exists():
        raise JobError(f"{ens}: nothing to resume (no such ensemble); {fresh} a new chain")
    if command == "train" and not model.exists():
        raise JobError(f"{model}: nothing to resume (no such model checkpoint); {fresh} training")
    if command == "run" and not ens.exists() and not (job.uses_flow and model.exists()):
        what = f"no ensemble {ens}" + (f" and no model checkpoint {model}" if job.uses_flow else "")
        raise JobError(f"{ens}: nothing to resume ({what}); {fresh} a new run")


# --- training -----------------------------------------------------------------


def train(job: JobConfig, *, resume: bool, comm: SerialComm) -> Path:
    """Train the job's flow by reverse KL; returns the checkpoint path."""
    device = rank_device(job, comm)
    theory = build_theory(job)
    if annealing_kinds.trains_craft(job.sampler):
        return annealing.train_craft(job, resume=resume, comm=comm, device=device, theory=theory)
    if annealing_kinds.trains_snf(job.sampler):
        return annealing.train_snf(job, resume=resume, comm=comm, device=device, theory=theory)
    model = build_model(job, device)
    if not any(p.requires_grad for p in model.parameters()):
        return _save_untrained(job, model, comm)
    t = job.train
    # one stream for the flow's draws and the stochastic log-det noise: checkpointed together, so a resumed
    # training run continues bit for bit whatever the target
    train_gen = make_generator(job.run.seed, STREAM_TRAIN, comm.rank, device=device)
    # train.target (latflow.fermions.training_target): "auto" = gauge action for pf-flow-mcmc, else theory.action
    action = training_action(theory, job.sampler.kind, t.target, estimator=t.estimator, generator=train_gen)
    trainer = ReverseKLTrainer(
        model,
        lambda x: -action(x),
        batch_size=t.batch_size,
        lr=t.lr,
        generator=train_gen,
        comm=comm,
        grad_clip=t.grad_clip or None,
        estimator=t.estimator,
        lr_schedule=t.lr_schedule,
        warmup_steps=t.warmup_steps,
        lr_min=t.lr_min,
        total_steps=t.steps,
        log_z=_training_log_z(theory, action),
    )
    path = job.output.model_path
    if resume and path.exists():
        read_checkpoint(job, path)  # before loading: a different model would fail inside torch
        trainer.load(path)
        log.info("resuming training from %s at step %d", path, trainer.step)
    if trainer.step >= t.steps:
        log.info("model %s already trained (%d steps)", path, trainer.step)
        return path
    bar = Progress(t.steps, "train", every=t.log_every, enabled=comm.is_root, initial=trainer.step)
    extra = {"signature": _model_signature(job), "job": job.record, "theory": job.theory.name}

    def report(m: Any) -> None:
        # called after each completed optimiser step: the one place where a stop signal ends training
        signum = termination.agreed(comm)  # every rank stops at the same step (the checkpoint gathers from all)
        if signum is not None:
            raise Terminated(signum, everywhere=True)
        if m.kl is None:
            bar.update(1, loss=m.loss, ess=m.ess)
        else:
            bar.update(1, loss=m.loss, kl=m.kl, ess=m.ess)

    before = _file_identity(path)
    try:
        # a stop signal (SIGTERM, or SIGUSR1 before the walltime) is only recorded during a step, so that the
        # checkpoint below holds a consistent state: model, optimiser, RNG, schedule and history of the last step
        with termination.deferred():
            history = trainer.train(
                t.steps, checkpoint_path=path, checkpoint_every=t.checkpoint_every, callback=report, extra=extra
            )
    except Terminated as exc:
        trainer.save(path, complete=False, extra=extra)
        if comm.is_root:
            log.info("stopped by %s: checkpoint %s written at step %d", exc.signal_name, path, trainer.step)
        comm.barrier()  # rank 0's line is written before any rank ends the job
        raise
    except TrainingDivergedError as exc:
        # the trainer says "the last good checkpoint is kept"; say which one there really is
        after = _file_identity(path)
        what = str(exc).split("; the last good checkpoint")[0]
        if after is None:
            raise TrainingDivergedError(f"{what}; no checkpoint was written ({path})") from None
        if after == before and not resume:
            raise TrainingDivergedError(
                f"{what}; {path} was not replaced and is from an earlier training run"
            ) from None
        raise
    finally:
        bar.close()
    n = min(len(history.ess), 50)
    if n:
        kl = [k for k in history.kl[-n:] if k is not None]
        log.info(
            "trained %d steps on %d rank(s): loss %.4f,%s batch ESS %.3f (mean of last %d steps)",
            trainer.step,
            comm.size,
            float(np.mean(history.loss[-n:])),
            f" KL {float(np.mean(kl)):.4f} nats," if len(kl) == n else "",
            float(np.mean(history.ess[-n:])),
            n,
        )
    if comm.is_root:
        _log_sector_check(job, theory, model, device)
    return path


def _training_log_z(theory: Any, action: Any) -> float | None:
    """Exact ``log Z`` of the training target in the measure of the flow's ``log q``, None if unknown.

    ``theory.exact_log_z()`` is in the normalisation of ENSEMBLE_FORMAT.md (compact fields under the
    Haar probability measure, real fields under Lebesgue measure); the flow's density is with respect
    to Lebesgue measure on the field space, whose log volume ``theory.field_log_volume()`` adds
    (``n_links log 2 pi`` for U(1) angles, 0 for real fields). Only for the theory's full action.
    """
    if action != theory.action:  # e.g. the gauge part alone of a theory with fermions
        return None
    exact = getattr(theory, "exact_log_z", None)
    log_z = exact() if callable(exact) else None
    if log_z is None:
        return None
    volume = getattr(theory, "field_log_volume", None)
    volume = volume() if callable(volume) else volume
    if volume is None:  # without the measure's volume log Z cannot be put in the flow's normalisation
        return None
    return float(log_z) + float(volume)


def _save_untrained(job: JobConfig, model: FlowModel, comm: SerialComm) -> Path:
    """A model without weights (the plaquette prior alone, ``model.n_layers = 0``): nothing to learn.

    Its checkpoint is written all the same, so that ``latflow sample`` finds the model it records.
    """
    path = job.output.model_path
    if comm.is_root:
        state = {"model": model.state_dict(), "step": 0, "complete": True, "history": {}}
        state.update(signature=_model_signature(job), job=job.record, theory=job.theory.name)
        checkpoint.save_atomic(state, path)
        log.info("model %s has no weights to train (the prior alone): checkpoint written", path)
    comm.barrier()
    return path


def _log_sector_check(job: JobConfig, theory: Any, model: FlowModel, device: torch.device) -> None:
    """Charges of raw flow proposals against the exact ``P(Q)`` (2D U(1) and theories that know it).

    A flow trained by reverse KL can drop topological sectors; the chain cannot repair what is never
    proposed. The missing mass is the exact probability of the sectors no proposal reached.
    """
    exact = getattr(theory, "exact_charge_distribution", None)
    if not callable(exact) or len(job.lattice.shape) != 2 or job.sampler.kind == "pf-flow-mcmc":
        return
    try:
        probs = exact()
    except ValueError:  # tiny lattices where the series is not implemented
        return
    gen = make_generator(job.run.seed, STREAM_CHECK, 1, device=device)
    charges = []
    with torch.no_grad():
        for _ in range(SECTOR_CHECK_PROPOSALS // SECTOR_CHECK_BATCH):
            x, _ = model.sample(SECTOR_CHECK_BATCH, gen)
            charges.append(theory.observables(x)["topological_charge"].double().cpu())
    check = sector_check(torch.cat(charges).numpy(), probs)
    level = logging.WARNING if check.missing_mass > max(10 * check.expected_missing_mass, 1e-3) else logging.INFO
    log.log(
        level, "sector check of %d flow proposals against the exact P(Q): %s", SECTOR_CHECK_PROPOSALS, check.summary()
    )


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of ``path``, None if absent: tells whether a run replaced the file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_checkpoint(job: JobConfig, path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The model checkpoint at ``path``; ``JobError`` if it is unreadable or made for another model."""
    try:
        state = checkpoint.load(path, map_location=device)
    except Exception as exc:  # torch raises many kinds on a file that is not a checkpoint
        raise JobError(f"{path}: not a readable latflow model checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise JobError(f"{path}: not a latflow model checkpoint (no 'model' weights)")
    if state.get("signature") != _model_signature(job):
        raise JobError(f"{path}: checkpoint was trained for a different model, lattice or dtype than {job.source}")
    return state


def load_model(job: JobConfig, device: torch.device, comm: SerialComm | None = None) -> FlowModel:
    """The trained flow of the job (checkpoint at ``output.model``), the same on every rank.

    Rank 0 reads the checkpoint and broadcasts its weights, so that every rank samples with the
    model rank 0 finished writing (and records in ``model_sha256``), never with a checkpoint that a
    slower rank 0 is still replacing; each rank then checks its weights' hash against rank 0's.
    """
    comm = comm or SerialComm()
    path = job.output.model_path
    payload: dict[str, Any] | None = None
    error = ""
    if comm.is_root:
        try:
            state = read_checkpoint(job, path, "cpu")
            complete = bool(state.get("complete", False))
            payload = {"model": state["model"], "complete": complete, "step": state.get("step")}
        except JobError as exc:
            error = str(exc)
    payload, error = comm.bcast((payload, error))
    if error:
        raise JobError(error)
    assert payload is not None
    model = build_model(job, device)
    model.load_state_dict(payload["model"])
    model.eval()
    sha = model_sha256(model)
    root_sha = comm.bcast(sha)
    if sha != root_sha:
        raise JobError(f"{path}: the model on rank {comm.rank} differs from rank 0's (sha256 {sha} != {root_sha})")
    if not payload["complete"] and comm.is_root:
        log.warning("model %s is from an unfinished training run (step %s)", path, payload["step"])
    return model


# --- sampling -----------------------------------------------------------------


# finite-variance check of the pseudofermion weights (pf-flow-mcmc): dense, so up to this volume
WEIGHT_CHECK_MAX_VOLUME = 256
WEIGHT_CHECK_CONFIGS = 8
WARN_LAMBDA = 0.6  # finite variance above 1/2, but a heavy tail close to it


def _check_fields(job: JobConfig, model: Any, device: torch.device) -> torch.Tensor:
    """``WEIGHT_CHECK_CONFIGS`` flow configurations of a stream of their own (the same on every rank), float64."""
    gen = make_generator(job.run.seed, STREAM_CHECK, device=device)
    with torch.no_grad():
        theta, _ = model.sample(WEIGHT_CHECK_CONFIGS, gen)
    return theta.to(torch.complex128 if theta.is_complex() else torch.float64)


def make_conditional(
    job: JobConfig, theory: Any, model: Any = None, device: torch.device | None = None
) -> ConditionalPseudofermions:
    """The pseudofermion conditional of a ``pf-flow-mcmc`` job (``sampler.conditional*`` keys).

    Wilson theories: ``"triangular"`` (default), ``"exact"``, ``"scalar"``; theories with staggered pseudofermions
    on a scalar background (the Yukawa theory): ``"free"`` (default), ``"exact"``, ``"scalar"``
    (:mod:`latflow.fermions.staggered_conditional`). With a ``model``, the free conditional's mass starts at the rms
    of the site mass ``m + g sigma`` over the flow configurations of the weight check.
    """
    s = job.sampler
    kind = s.resolved_conditional(job.theory.name)
    if job.theory.name in STAGGERED_THEORIES:
        if kind == "exact":
            return ExactStaggeredConditional(theory.dirac)
        if kind == "scalar":
            return ScalarStaggeredConditional(theory.dirac, scale=s.conditional_dispersion)
        if kind == "free":
            fields = None if model is None else _check_fields(job, model, device or torch.device("cpu"))
            mass = default_free_mass(theory.dirac, fields)
            return FreeStaggeredConditional(theory.dirac, mass=mass, dispersion=s.conditional_dispersion)
        raise JobError(f"{job.source}: 'sampler.conditional' = {kind!r}: not available for theory '{job.theory.name}'")
    if kind == "free":
        raise JobError(
            f"{job.source}: 'sampler.conditional' = 'free' is for staggered theories; allowed here: "
            "'triangular', 'exact', 'scalar'"
        )
    factors = dict(even_odd=s.even_odd, hasenbusch_kappas=tuple(s.hasenbusch_kappas))
    if kind == "exact":
        return ExactConditional(theory.dirac, **factors)
    if kind == "scalar":
        return ScalarConditional(theory.dirac, scale=s.conditional_dispersion, **factors)
    return TriangularConditional(
        theory.dirac, nested=s.conditional_nested, dispersion=s.conditional_dispersion, **factors
    )


def check_weight_variance(
    job: JobConfig, conditional: ConditionalPseudofermions, model: Any, device: torch.device
) -> float | None:
    """Refuse a conditional whose joint weights would have an infinite variance; returns ``lambda_min``.

    On ``WEIGHT_CHECK_CONFIGS`` configurations of the trained flow (a stream of their own, the same
    on every rank) the smallest generalised eigenvalue of ``(M M^dag, K)`` must exceed 1/2
    (:func:`~latflow.fermions.conditional.covariance_ratio_spectrum`): below it the weights'
    variance is infinite and neither the chain's error bars nor its acceptance mean anything, so
    the job stops (``JobError`` suggesting a dispersion) rather than produce a misleading ensemble.
    Between 1/2 and 0.6 it warns. Dense, so above ``WEIGHT_CHECK_MAX_VOLUME`` sites it only warns
    that it cannot check (``None``). The exact conditional has ``lambda = 1``. For a staggered conditional the
    backgrounds are the flow's scalar fields themselves.
    """
    s = job.sampler
    if s.resolved_conditional(job.theory.name) == "exact":
        return 1.0
    volume = math.prod(job.lattice.shape)
    if volume > WEIGHT_CHECK_MAX_VOLUME:
        log.warning(
            "pf-flow-mcmc: cannot check that the pseudofermion weights have a finite variance at volume %d "
            "(dense check up to %d sites); heavy-tailed weights make errors meaningless: check the weights' "
            "tail diagnostic in 'latflow analyze' and widen sampler.conditional_dispersion if it warns",
            volume,
            WEIGHT_CHECK_MAX_VOLUME,
        )
        return None
    theta = _check_fields(job, model, device)
    with torch.no_grad():
        if isinstance(conditional, StaggeredConditional):  # background: the scalar field itself
            lam = float(smallest_staggered_covariance_ratio(conditional, theta).min())
        else:
            links = field_manifold(build_theory(job)).links(theta)  # U(1) angles -> exp(i theta); SU(N): the links
            lam = float(smallest_covariance_ratio(conditional, links).min())
    d = s.conditional_dispersion
    if lam <= FINITE_VARIANCE_LAMBDA:
        hint = (
            ""
            if isinstance(conditional, StaggeredConditional)
            else " (or even_odd = true / hasenbusch_kappas, which raise it)"
        )
        raise JobError(
            f"{job.source}: 'sampler.conditional_dispersion' = {d}: the pseudofermion weights would have infinite "
            f"variance (smallest eigenvalue of (M M^dag, K) {lam:.3f} <= 1/2 on {WEIGHT_CHECK_CONFIGS} flow "
            f"configurations); use sampler.conditional_dispersion = {dispersion_for(lam, d)}{hint}"
        )
    if lam < WARN_LAMBDA:
        log.warning(
            "pf-flow-mcmc: the pseudofermion weights have a finite but heavy-tailed variance (smallest eigenvalue "
            "of (M M^dag, K) %.3f, finite above 0.5); sampler.conditional_dispersion = %s would make it ~0.7",
            lam,
            dispersion_for(lam, d),
        )
    else:
        log.info("pf-flow-mcmc: finite-variance check passed (smallest eigenvalue of (M M^dag, K) %.3f > 0.5)", lam)
    return lam


def _with_solver(s: Any, sampler: Any) -> Any:
    """``sampler`` with the job's ``cg_solver`` / ``cg_check_every`` set on its pseudofermions (where they apply)."""
    pf = getattr(sampler, "pseudofermions", None)
    if hasattr(pf, "set_solver"):
        pf.set_solver(s.cg_solver, check_every=s.cg_check_every or None)
    return sampler


def _make_sampler(job: JobConfig, theory: Any, model: FlowModel | None, comm: SerialComm, device: torch.device) -> Any:
    s = job.sampler
    gen = make_generator(job.run.seed, STREAM_SAMPLE, comm.rank, device=device)
    if s.kind == "flow-mcmc":
        assert model is not None
        return FlowMCMC(model, lambda x: -theory.action(x), batch_size=s.batch_size, generator=gen, chain_id=comm.rank)
    if isinstance(s, annealing_kinds.PIMHSettings):
        return annealing.build_pimh(job, theory, device, gen, comm)
    # the pseudofermion factors and their solves, common to both pseudofermion samplers
    pf = (
        dict(even_odd=s.even_odd, hasenbusch_kappas=tuple(s.hasenbusch_kappas), tol=s.cg_tol, max_iter=s.cg_max_iter)
        if isinstance(s, PseudofermionSettings)
        else {}
    )
    if s.kind == "pf-flow-mcmc":
        conditional = make_conditional(job, theory, model, device)
        check_weight_variance(job, conditional, model, device)
        return _with_solver(
            s,
            PseudofermionFlowMCMC.for_theory(
                theory, model, batch_size=s.batch_size, generator=gen, chain_id=comm.rank, conditional=conditional, **pf
            ),
        )
    if s.kind not in ("hmc", "pf-hmc"):
        raise JobError(f"{job.source}: 'sampler.kind' = {s.kind!r}: no sampler of this kind is wired into the runner")
    x0 = initial_field(job, theory, s.n_chains, gen, device)
    if s.kind == "pf-hmc":
        return _with_solver(
            s,
            PseudofermionHMC.for_theory(
                theory,
                x0,
                step_size=s.step_size,
                n_steps=s.n_steps,
                generator=gen,
                integrator=s.integrator,
                step_jitter=s.step_jitter,
                chain_offset=comm.rank * s.n_chains,
                time_scales=tuple(s.time_scales),
                chrono=s.chrono,
                **pf,
            ),
        )
    return HMC(
        theory.action,
        x0,
        step_size=s.step_size,
        n_steps=s.n_steps,
        generator=gen,
        integrator=s.integrator,
        force=getattr(theory, "force", None),
        project=getattr(theory, "project", None),
        chain_offset=comm.rank * s.n_chains,
        step_jitter=s.step_jitter,
        manifold=field_manifold(theory),
    )


# --- where chains start ---------------------------------------------------------


def initial_field(
    job: JobConfig, theory: Any, n_chains: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The fields ``[n_chains, *field_shape]`` HMC chains start from (``sampler.start``).

    A keyword goes to the theory's ``initial_field(n_chains, generator, start, dtype=, device=)`` when it has
    one, else to :func:`default_initial_field`; a file (:func:`read_start`) starts every chain from the same
    configuration. ``dtype`` is the real precision of the run (complex fields take the matching complex one).
    """
    start, dtype = job.sampler.start, torch_dtype(job)
    if start not in START_KEYWORDS:
        x = torch.from_numpy(read_start(job, theory)).to(device=device)
        x = x.to(dtype=dtype.to_complex() if x.is_complex() else dtype)
        x = field_manifold(theory).project(x.unsqueeze(0))
        return x.expand(n_chains, *x.shape[1:]).clone()
    make = getattr(theory, "initial_field", None)
    if callable(make):
        return make(n_chains, generator, start, dtype=dtype, device=device)
    shape = (n_chains, *theory.field_shape)
    return default_initial_field(field_manifold(theory), shape, generator, start, dtype, device)


def default_initial_field(
    manifold: Any,
    shape: tuple[int, ...],
    generator: torch.Generator,
    start: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Starts of real fields and U(1) angles ``shape = [B, *field_shape]`` for theories without ``initial_field``.

    ``"default"``: ``0.1 N(0, 1)`` (the start of every earlier version, bit for bit); ``"cold"``: zeros (unit
    links); ``"hot"``: uniform angles in ``(-pi, pi]`` (Haar links) or standard normal real fields.
    """
    if start == "default":
        return 0.1 * torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if start == "cold":
        return torch.zeros(shape, dtype=dtype, device=device)
    if start == "hot":
        if isinstance(manifold, U1Angles):
            return math.pi * (1 - 2 * torch.rand(shape, generator=generator, dtype=dtype, device=device))
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"unknown start {start!r}; allowed: {', '.join(START_KEYWORDS)} or a file")


GROUP_TOLERANCE = 1e-5  # max |U^dagger U - 1| and |det U - 1| of a start configuration (float32 files pass)


def read_start(job: JobConfig, theory: Any) -> np.ndarray:
    """The configuration ``[*field_shape]`` in the file ``sampler.start``, checked against the theory.

    An HDF5 file is read as a latflow ensemble (its last stored configuration of ``fields/<field_name>``);
    any other file with :func:`latflow.configio.read_configuration` (SU(N) links ``[d, L..., N, N]``).
    Every mistake is a one-line :class:`JobError` naming the job file, ``sampler.start`` and what is allowed.
    """
    import h5py

    path = Path(job.sampler.start)
    where = f"{job.source}: 'sampler.start' = {job.sampler.start!r}"
    manifold = field_manifold(theory)
    if not path.is_file():
        raise JobError(f"{where}: no such file; allowed: {', '.join(map(repr, START_KEYWORDS))} or a file")
    if h5py.is_hdf5(path):
        name = f"fields/{theory.field_name}"
        try:
            with EnsembleReader(path) as r:
                if not r.has(name):
                    raise JobError(f"{where}: the ensemble has no {name}; it needs one of theory '{job.theory.name}'")
                rows = r.read(name, slice(-1, None))
        except EnsembleError as exc:
            raise JobError(f"{where}: not a latflow ensemble ({str(exc).removeprefix(f'{path}: ')})") from None
        if len(rows) == 0:
            raise JobError(f"{where}: the ensemble has no stored configuration yet")
        x = np.asarray(rows[0])
    else:
        try:
            from latflow import configio
        except ImportError:
            raise JobError(
                f"{where}: configuration files (ILDG, NERSC, ...) cannot be read by this version (no "
                "latflow.configio); use an ensemble .h5, 'cold' or 'hot'"
            ) from None
        if not (isinstance(manifold, SUN) and manifold.n == 3):
            raise JobError(
                f"{where}: configuration files hold SU(3) links; theory '{job.theory.name}' has {manifold.name} "
                "fields: use an ensemble .h5, 'cold' or 'hot'"
            )
        dim = len(job.lattice.shape)
        try:  # a 2D job reads a 2D lattice embedded in 4D as 2D (latflow.configio)
            x, _ = configio.read_configuration(path, ndim=dim if dim in (2, 4) else None)
        except (OSError, ValueError) as exc:
            raise JobError(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        x = np.asarray(x)
    want = tuple(theory.field_shape)
    if tuple(x.shape) != want:
        raise JobError(
            f"{where}: holds a field of shape {list(x.shape)}; theory '{job.theory.name}' on 'lattice.shape' = "
            f"{list(job.lattice.shape)} needs {list(want)}"
        )
    _check_group(x, manifold, where)
    return x


def _check_group(x: np.ndarray, manifold: Any, where: str) -> None:
    """``JobError`` unless ``x`` ``[*field_shape]`` lies on ``manifold`` (SU(N): unitary, unit determinant)."""
    if isinstance(manifold, SUN):
        if not np.iscomplexobj(x):
            raise JobError(f"{where}: holds real numbers; {manifold.name} links are complex matrices")
        m = x.reshape(-1, manifold.n, manifold.n).astype(np.complex128)
        unitary = np.abs(np.conj(np.swapaxes(m, -1, -2)) @ m - np.eye(manifold.n)).max(initial=0.0)
        det = np.abs(np.linalg.det(m) - 1).max(initial=0.0)
        if not (unitary <= GROUP_TOLERANCE and det <= GROUP_TOLERANCE):
            raise JobError(
                f"{where}: not {manifold.name} links (max |U^dagger U - 1| = {unitary:.2g}, max |det U - 1| = "
                f"{det:.2g}; allowed: {GROUP_TOLERANCE:g})"
            )
        return
    if np.iscomplexobj(x):
        raise JobError(f"{where}: holds complex numbers; {manifold.name} fields are real")
    if not np.all(np.isfinite(x)):
        raise JobError(f"{where}: holds values that are not finite")


MEASURE_CHUNK = 256  # configurations per call of theory.observables (bounds the memory of a block)


def measure(
    theory: Any, x: torch.Tensor, new_state: torch.Tensor | None = None, chunk: int = MEASURE_CHUNK
) -> dict[str, np.ndarray]:
    """``{"observables/<name>": [n]}`` of configurations ``x`` ``[n, *field_shape]``, ``chunk`` at a time.

    The cost per configuration is the theory's (Schwinger: exact dense observables only up to
    ``dense_max_volume``, stochastic CG estimates above); the memory is that of one chunk,
    whatever ``commit_every`` and the number of chains. ``new_state`` ``[n]`` bool (one chain in
    Markov order): rows where it is false repeat the previous row's configuration, whose values
    they get without measuring it again (flow-MCMC: the rejected steps).
    """
    index = None
    if new_state is not None and x.shape[0]:
        new_state = new_state.to(torch.bool).cpu().clone()
        new_state[0] = True
        index = (torch.cumsum(new_state.long(), 0) - 1).numpy()
        x = x[new_state.to(x.device)]
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            for name, value in theory.observables(x[i : i + chunk]).items():
                parts.setdefault(f"observables/{name}", []).append(value.detach().cpu().numpy())
    values = {k: np.concatenate(v) for k, v in parts.items()}
    return values if index is None else {k: v[index] for k, v in values.items()}


def _meta(job: JobConfig, theory: Any, model: FlowModel | None) -> EnsembleMeta:
    return EnsembleMeta(
        theory=job.theory.name,
        couplings=theory.couplings(),
        lattice_shape=tuple(job.lattice.shape),
        sampler=sampler_settings(job),
        seed=job.run.seed,
        job=job.record,
        model_sha256=model_sha256(model) if model is not None else "",
        storage=storage_settings(job),
    )


def dataset_attrs(theory: Any) -> dict[str, dict[str, Any]]:
    """HDF5 attributes of the ensemble's observable datasets, from what the theory says about them.

    ``theory.observable_descriptions()`` (name -> text) gives ``description``;
    ``theory.observable_info()`` (name -> ``"exact: ..."`` or ``"stochastic: ..."``) gives
    ``estimator`` (and the description where there is none); ``theory.observable_attrs()``
    (name -> {attribute: value}, optional) adds more.
    """
    out: dict[str, dict[str, Any]] = {}
    describe = getattr(theory, "observable_descriptions", None)
    for name, text in (describe() if callable(describe) else {}).items():
        out.setdefault(f"observables/{name}", {})["description"] = str(text)
    info = getattr(theory, "observable_info", None)  # "exact: ..." / "stochastic: ..." by name
    for name, text in (info() if callable(info) else {}).items():
        kind, sep, rest = str(text).partition(":")
        entry = out.setdefault(f"observables/{name}", {})
        if sep and kind.strip() in ("exact", "stochastic"):
            entry["estimator"] = kind.strip()
            text = rest.strip()
        entry.setdefault("description", str(text))
    extra = getattr(theory, "observable_attrs", None)
    for name, attrs in (extra() if callable(extra) else {}).items():
        out.setdefault(f"observables/{name}", {}).update(attrs)
    return out


def thin_fields(rows: dict[str, np.ndarray], recorded: int, k: int, save_every: int) -> dict[str, np.ndarray]:
    """Keep the configurations of a block only every ``save_every`` steps of each chain.

    Parameters
    ----------
    rows
        One rank's block: ``k`` steps of ``B`` chains, trajectory-major (``k * B`` rows).
    recorded
        Steps per chain recorded before this block.
    k
        Steps in this block.
    save_every
        A configuration is kept after step ``i`` (0-based, per chain, counted from the first
        recorded step) when ``(i + 1) % save_every == 0``.

    Returns
    -------
    dict
        ``rows`` with ``fields/*`` cut to the kept configurations and ``fields/row``, their
        (block-relative) row numbers, int64 ``(m,)``.
    """
    n = len(rows["markov/chain"])
    i = recorded + np.arange(n) // max(1, n // k)
    keep = (i + 1) % save_every == 0
    out = {key: (value[keep] if key.startswith("fields/") else value) for key, value in rows.items()}
    out[FIELD_INDEX] = np.flatnonzero(keep).astype(np.int64)
    return out


def _check_resumable(path: Path, meta: EnsembleMeta, *, check_model: bool = True) -> None:
    with EnsembleReader(path) as r:
        old = r.meta
    mine = {k: v for k, v in meta.sampler.items() if k != "n_samples"}
    theirs = {k: v for k, v in old.sampler.items() if k != "n_samples"}
    checks = [
        ("theory", old.theory, meta.theory),
        ("couplings", old.couplings, meta.couplings),
        ("lattice_shape", tuple(old.lattice_shape), tuple(meta.lattice_shape)),
        ("seed", old.seed, meta.seed),
        ("sampler", json.loads(json.dumps(theirs)), json.loads(json.dumps(mine))),
        ("storage", old.storage_settings, meta.storage_settings),
    ]
    if check_model:
        checks.append(("model_sha256", old.model_sha256, meta.model_sha256))
    for name, a, b in checks:
        if a != b:
            raise JobError(f"{path}: cannot resume: the file's {name} {a} differs from this job's {b}")


def _open_writer(
    job: JobConfig, theory: Any, meta: EnsembleMeta, path: Path, *, resume: bool, force: bool
) -> tuple[EnsembleWriter, bytes | None]:
    """Rank 0: the ensemble writer, resumed (with the stored sampler state) or created."""
    if resume and path.exists():
        _check_resumable(path, meta)
        writer, blob = EnsembleWriter.resume(path)
        writer.set_dataset_attrs(dataset_attrs(theory))
        log.info("resuming %s at %d committed rows", path, writer.n_committed)
        return writer, blob
    return EnsembleWriter.create(path, meta, force=force, dataset_attrs=dataset_attrs(theory)), None


def _commit_block(
    writer: EnsembleWriter, gathered: list[tuple[dict[str, np.ndarray], Any]], recorded: int, n_acc: int, n_rows: int
) -> tuple[int, int]:
    """Rank 0: commit one block of every rank (rank after rank) with all ranks' sampler states.

    Parameters
    ----------
    writer
        The ensemble's writer.
    gathered
        ``(rows, state)`` of ranks ``0 .. R-1``; ``rows`` maps dataset names to arrays with the rank's
        ``n_r`` rows of this block (``fields/row``, if present, block-relative), ``state`` is the rank's
        sampler state after the block.
    recorded
        Steps per chain recorded once this block is committed.
    n_acc, n_rows
        Accepted steps and rows committed so far this run.

    Returns
    -------
    tuple of int
        ``n_acc`` and ``n_rows`` with this block's rows counted.
    """
    keys = gathered[0][0].keys()
    merged = {key: np.concatenate([g[0][key] for g in gathered]) for key in keys}
    if FIELD_INDEX in merged:  # block-relative rows of each rank -> rows of the file
        offsets = writer.n_committed + np.cumsum([0] + [len(g[0]["markov/chain"]) for g in gathered])
        merged[FIELD_INDEX] = np.concatenate([g[0][FIELD_INDEX] + o for g, o in zip(gathered, offsets)])
    writer.append(merged, state_to_bytes({"ranks": [g[1] for g in gathered], "recorded": recorded}))
    accepted = merged["markov/accepted"]
    return n_acc + int(accepted.sum()), n_rows + len(accepted)


def sample(job: JobConfig, *, resume: bool, force: bool, comm: SerialComm) -> Path:
    """Sample the job's ensemble (rank 0 writes; every rank runs its own chain(s))."""
    device = rank_device(job, comm)
    theory = build_theory(job)
    path = Path(job.output.path)
    if annealing_kinds.is_weighted(job.sampler):

        def open_weighted(sha: str) -> tuple[EnsembleWriter, bytes | None]:
            meta = dataclasses.replace(_meta(job, theory, None), model_sha256=sha)
            return _open_writer(job, theory, meta, path, resume=resume, force=force)

        return annealing.sample_weighted(job, theory, device, comm=comm, open_writer=open_weighted, measure=measure)
    pimh = isinstance(job.sampler, annealing_kinds.PIMHSettings)
    model = load_model(job, device, comm) if job.uses_flow and not pimh else None
    sampler = _make_sampler(job, theory, model, comm, device)
    s = job.sampler
    meta = _meta(job, theory, model)
    if pimh and job.uses_flow:  # PIMH over CRAFT runs: the hash of the trained transport flows
        meta = dataclasses.replace(meta, model_sha256=annealing.flows_sha(sampler.proposal))

    writer = None
    blob: bytes | None = None
    error = ""
    if comm.is_root:
        # rank 0 opens the file; the outcome is broadcast so that no rank waits on a failed one
        try:
            writer, blob = _open_writer(job, theory, meta, path, resume=resume, force=force)
        except (JobError, EnsembleError) as exc:
            error = str(exc)
    blob, error = comm.bcast((blob, error))
    if error:
        raise JobError(error)
    recorded = 0
    if blob is not None:
        state = state_from_bytes(blob)
        if len(state["ranks"]) != comm.size:
            raise JobError(f"{path}: written by {len(state['ranks'])} rank(s); resume it with the same number")
        sampler.load_state_dict(state["ranks"][comm.rank])
        recorded = int(state["recorded"])
    else:
        if isinstance(sampler, HMC) and s.tune and s.n_tune:
            eps = comm.allreduce_sum(sampler.tune(s.n_tune, s.target_acceptance)) / comm.size
            # every rank integrates with the same (rank-averaged) tuned step size
            sampler.set_step_size(eps)
            log.info("HMC step size tuned to %.4g (%d steps per trajectory)", sampler.step_size, sampler.n_steps)
        if s.burn_in:
            sampler.run(s.burn_in)

    chains = comm.size * (s.n_chains if isinstance(sampler, HMC) else 1)
    first = recorded  # steps per chain recorded before this run
    save_every = job.output.save_every
    bar = Progress(s.n_samples, "sample", every=s.log_every, enabled=comm.is_root, initial=recorded)
    n_acc = n_rows = 0
    # every rank hands its blocks to rank 0 without waiting for rank 0's commits (latflow.mpi_blocks)
    pipe = BlockPipe(comm)
    try:
        while recorded < s.n_samples:
            k = min(s.commit_every, s.n_samples - recorded)
            block = sampler.run(k)
            rows = block.rows(theory.field_name)
            # a flow chain's rejected steps repeat its previous configuration: measured once
            rows.update(measure(theory, block.x, block.accepted if isinstance(sampler, FlowMCMC) else None))
            if save_every > 1:
                rows = thin_fields(rows, recorded, k, save_every)
            recorded += k
            gathered = pipe.put((rows, sampler.state_dict()))
            if comm.is_root:
                assert gathered is not None and writer is not None
                n_acc, n_rows = _commit_block(writer, gathered, recorded, n_acc, n_rows)
                bar.update(k, acc=n_acc / max(n_rows, 1))
        pipe.close()  # not on an error: the command line's handler ends every rank
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if comm.is_root:
        total = f"; {recorded} steps per chain in the file" if first else ""
        log.info(
            "wrote %s: %d steps x %d chain(s) this run%s, acceptance %.3f this run",
            path,
            recorded - first,
            chains,
            total,
            n_acc / max(n_rows, 1),
        )
    return path


# --- analysis -----------------------------------------------------------------


def _theory_of_ensemble(theory_name: str, couplings: dict, lattice_shape: tuple[int, ...]) -> Any | None:
    """The theory an ensemble was made for, or None if this version cannot build it (unknown name or couplings)."""
    try:
        spec = get_spec(theory_name)
        fields = {f.name for f in dataclasses.fields(spec.params)}
        return spec.build(spec.params(**{k: v for k, v in couplings.items() if k in fields}), Lattice(lattice_shape))
    except (KeyError, TypeError, ValueError):
        return None


def _derived_of(theory: Any | None) -> dict[str, DerivedObservable]:
    """Derived observables the theory defines (none for ``None``), for the analysis of an ensemble."""
    if theory is None:
        return {}
    return {
        name: DerivedObservable(tuple(d.inputs), d.func, d.description)
        for name, d in theory.derived_observables().items()
    }


def _exact_means_of(theory: Any | None) -> dict[str, float]:
    """Exact means the theory declares (``exact_means()``, e.g. ``<Q> = 0`` by symmetry); none for ``None``."""
    means = getattr(theory, "exact_means", None)
    return {k: float(v) for k, v in means().items()} if callable(means) else {}


def exact_means_for(theory_name: str, couplings: dict, lattice_shape: tuple[int, ...]) -> dict[str, float]:
    """Exact means the theory of an ensemble declares, for the analysis."""
    return _exact_means_of(_theory_of_ensemble(theory_name, couplings, lattice_shape))


def analyze(path: str | Path, *, means: dict[str, float] | None = None, check_checksums: bool = True) -> dict[str, Any]:
    """Analyse an ensemble: the theory's derived observables and exact means, ``means`` overriding the latter."""
    with EnsembleReader(path) as r:
        theory = _theory_of_ensemble(r.theory, r.couplings, tuple(r.lattice_shape))
        present = set(r.names("observables"))
        weighted = r.is_weighted
    derived = _derived_of(theory)
    known = {k: v for k, v in _exact_means_of(theory).items() if k in present}
    known.update(means or {})
    exact = getattr(theory, "exact_log_z", None)  # weighted ensembles compare their log Z with it
    log_z = exact() if weighted and callable(exact) else None
    return analyze_ensemble(
        path, derived=derived, known_means=known, check_checksums=check_checksums, exact_log_z=log_z
    )


def log_job(job: JobConfig, comm: SerialComm) -> None:
    log.info("job %s (%d rank(s)): %s", job.source, comm.size, json.dumps(to_dict(job)))
