"""Wires a validated job to the engine: theory + model + trainer/sampler + ensemble writer.

Only this module (with :mod:`latflow.jobs.cli`) reads configuration; everything
it calls takes tensors, numbers and objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latflow import checkpoint
from latflow.analysis import DerivedObservable, analyze_ensemble
from latflow.ensemble import EnsembleError, EnsembleMeta, EnsembleReader, EnsembleWriter
from latflow.flows import FlowModel, make_affine_flow, model_sha256
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.lattice import Lattice
from latflow.mpi import SerialComm
from latflow.rng import make_generator, stream_seed
from latflow.samplers import HMC, FlowMCMC, PseudofermionFlowMCMC, PseudofermionHMC, state_from_bytes, state_to_bytes
from latflow.theories import get_spec
from latflow.training import ReverseKLTrainer, TrainingDivergedError

from .config import JobConfig, JobError, sampler_settings, to_dict
from .progress import Progress

log = logging.getLogger("latflow")

# independent random streams of one seed: (seed, purpose, rank)
STREAM_TRAIN, STREAM_SAMPLE, STREAM_INIT = 0, 1, 2


def torch_dtype(job: JobConfig) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[job.run.dtype]


def rank_device(job: JobConfig, comm: SerialComm) -> torch.device:
    """``cpu``, or this rank's GPU (``cuda:rank mod n_gpus``); ``JobError`` if CUDA is absent."""
    if job.run.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise JobError(f"{job.source}: 'run.device' = 'cuda' but no CUDA device is available; use 'cpu'")
    return torch.device("cuda", comm.rank % torch.cuda.device_count())


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
        else:
            model = make_u1_equivariant_flow(
                lattice, m.n_layers, m.inner, m.hidden, m.kernel_size, n_mix=m.n_mix, n_bins=m.n_bins, dtype=torch.float64
            )
    return model.to(device=device, dtype=torch_dtype(job))


def _model_signature(job: JobConfig) -> str:
    return json.dumps(
        {"model": dataclasses.asdict(job.model), "lattice": list(job.lattice.shape), "dtype": job.run.dtype},
        sort_keys=True,
    )


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
        raise JobError(f"{src}: 'sampler.kind' = 'hmc' has no flow to train; use 'latflow sample' or 'latflow run'")
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
    if command == "sample" and job.uses_flow and not model.exists():
        raise JobError(f"{model}: no trained model; run 'latflow train {src}' first (or 'latflow run')")
    if job.run.device == "cuda" and not torch.cuda.is_available():
        raise JobError(f"{src}: 'run.device' = 'cuda' but no CUDA device is available; allowed here: 'cpu'")
    if job.uses_flow and model.exists() and (command == "sample" or (resume and command in ("train", "run"))):
        read_checkpoint(job, model)
    if resume and command in ("sample", "run") and ens.exists():
        _check_resumable(ens, _meta(job, build_theory(job), None), check_model=False)


# --- training -----------------------------------------------------------------


def train(job: JobConfig, *, resume: bool, comm: SerialComm) -> Path:
    """Train the job's flow by reverse KL; returns the checkpoint path."""
    device = rank_device(job, comm)
    theory = build_theory(job)
    model = build_model(job, device)
    t = job.train
    # the joint pseudofermion chain needs no determinant anywhere: its flow learns the gauge action
    action = theory.gauge_action if job.sampler.kind == "pf-flow-mcmc" else theory.action
    trainer = ReverseKLTrainer(
        model,
        lambda x: -action(x),
        batch_size=t.batch_size,
        lr=t.lr,
        generator=make_generator(job.run.seed, STREAM_TRAIN, comm.rank, device=device),
        comm=comm,
        grad_clip=t.grad_clip or None,
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
        bar.update(1, loss=m.loss, ess=m.ess)

    before = _file_identity(path)
    try:
        history = trainer.train(t.steps, checkpoint_path=path, checkpoint_every=t.checkpoint_every, callback=report, extra=extra)
    except TrainingDivergedError as exc:
        # the trainer says "the last good checkpoint is kept"; say which one there really is
        after = _file_identity(path)
        what = str(exc).split("; the last good checkpoint")[0]
        if after is None:
            raise TrainingDivergedError(f"{what}; no checkpoint was written ({path})") from None
        if after == before and not resume:
            raise TrainingDivergedError(f"{what}; {path} was not replaced and is from an earlier training run") from None
        raise
    finally:
        bar.close()
    n = min(len(history.ess), 50)
    if n:
        log.info(
            "trained %d steps on %d rank(s): loss %.4f, batch ESS %.3f (mean of last %d steps)",
            trainer.step, comm.size, float(np.mean(history.loss[-n:])), float(np.mean(history.ess[-n:])), n,
        )
    return path


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


def load_model(job: JobConfig, device: torch.device) -> FlowModel:
    """The trained flow of the job (checkpoint at ``output.model``)."""
    path = job.output.model_path
    state = read_checkpoint(job, path, device)
    model = build_model(job, device)
    model.load_state_dict(state["model"])
    model.eval()
    if not state.get("complete", False):
        log.warning("model %s is from an unfinished training run (step %s)", path, state.get("step"))
    return model


# --- sampling -----------------------------------------------------------------


def _make_sampler(job: JobConfig, theory: Any, model: FlowModel | None, comm: SerialComm, device: torch.device) -> Any:
    s = job.sampler
    gen = make_generator(job.run.seed, STREAM_SAMPLE, comm.rank, device=device)
    if s.kind == "flow-mcmc":
        assert model is not None
        return FlowMCMC(model, lambda x: -theory.action(x), batch_size=s.batch_size, generator=gen, chain_id=comm.rank)
    # the pseudofermion factors and their solves, common to both pseudofermion samplers
    pf = dict(even_odd=s.even_odd, hasenbusch_kappas=tuple(s.hasenbusch_kappas), tol=s.cg_tol, max_iter=s.cg_max_iter)
    if s.kind == "pf-flow-mcmc":
        return PseudofermionFlowMCMC.for_theory(
            theory, model, batch_size=s.batch_size, generator=gen, chain_id=comm.rank, **pf
        )
    x0 = 0.1 * torch.randn((s.n_chains, *theory.field_shape), generator=gen, dtype=torch_dtype(job), device=device)
    if s.kind == "pf-hmc":
        return PseudofermionHMC.for_theory(
            theory,
            x0,
            step_size=s.step_size,
            n_steps=s.n_steps,
            generator=gen,
            integrator=s.integrator,
            step_jitter=s.step_jitter,
            chain_offset=comm.rank * s.n_chains,
            **pf,
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
    )


def _meta(job: JobConfig, theory: Any, model: FlowModel | None) -> EnsembleMeta:
    return EnsembleMeta(
        theory=job.theory.name,
        couplings=theory.couplings(),
        lattice_shape=tuple(job.lattice.shape),
        sampler=sampler_settings(job),
        seed=job.run.seed,
        job=job.record,
        model_sha256=model_sha256(model) if model is not None else "",
    )


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
    ]
    if check_model:
        checks.append(("model_sha256", old.model_sha256, meta.model_sha256))
    for name, a, b in checks:
        if a != b:
            raise JobError(f"{path}: cannot resume: the file's {name} {a} differs from this job's {b}")


def sample(job: JobConfig, *, resume: bool, force: bool, comm: SerialComm) -> Path:
    """Sample the job's ensemble (rank 0 writes; every rank runs its own chain(s))."""
    device = rank_device(job, comm)
    theory = build_theory(job)
    model = load_model(job, device) if job.uses_flow else None
    sampler = _make_sampler(job, theory, model, comm, device)
    s = job.sampler
    path = Path(job.output.path)
    meta = _meta(job, theory, model)

    writer = None
    blob: bytes | None = None
    error = ""
    if comm.is_root:
        # rank 0 opens the file; the outcome is broadcast so that no rank waits on a failed one
        try:
            if resume and path.exists():
                _check_resumable(path, meta)
                writer, blob = EnsembleWriter.resume(path)
                log.info("resuming %s at %d committed rows", path, writer.n_committed)
            else:
                writer = EnsembleWriter.create(path, meta, force=force)
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
        if s.thermalization:
            sampler.run(s.thermalization)

    chains = comm.size * (s.n_chains if isinstance(sampler, HMC) else 1)
    bar = Progress(s.n_samples, "sample", every=s.log_every, enabled=comm.is_root, initial=recorded)
    n_acc = n_rows = 0
    try:
        while recorded < s.n_samples:
            k = min(s.commit_every, s.n_samples - recorded)
            block = sampler.run(k)
            rows = block.rows(theory.field_name)
            with torch.no_grad():
                for name, value in theory.observables(block.x).items():
                    rows[f"observables/{name}"] = value.detach().cpu().numpy()
            recorded += k
            gathered = comm.gather((rows, sampler.state_dict()))
            if comm.is_root:
                assert gathered is not None and writer is not None
                merged = {key: np.concatenate([g[0][key] for g in gathered]) for key in rows}
                writer.append(merged, state_to_bytes({"ranks": [g[1] for g in gathered], "recorded": recorded}))
                n_acc += int(merged["markov/accepted"].sum())
                n_rows += len(merged["markov/accepted"])
                bar.update(k, acc=n_acc / max(n_rows, 1))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if comm.is_root:
        log.info("wrote %s: %d steps x %d chain(s), acceptance %.3f this run", path, recorded, chains, n_acc / max(n_rows, 1))
    return path


# --- analysis -----------------------------------------------------------------


def derived_for(theory_name: str, couplings: dict, lattice_shape: tuple[int, ...]) -> dict[str, DerivedObservable]:
    """Derived observables the theory defines, for the analysis of an ensemble."""
    try:
        spec = get_spec(theory_name)
        fields = {f.name for f in dataclasses.fields(spec.params)}
        theory = spec.build(spec.params(**{k: v for k, v in couplings.items() if k in fields}), Lattice(lattice_shape))
    except (KeyError, TypeError, ValueError):
        return {}
    return {
        name: DerivedObservable(tuple(d.inputs), d.func, d.description) for name, d in theory.derived_observables().items()
    }


def analyze(path: str | Path) -> dict[str, Any]:
    with EnsembleReader(path) as r:
        derived = derived_for(r.theory, r.couplings, tuple(r.lattice_shape))
    return analyze_ensemble(path, derived=derived)


def log_job(job: JobConfig, comm: SerialComm) -> None:
    log.info("job %s (%d rank(s)): %s", job.source, comm.size, json.dumps(to_dict(job)))
