"""Runs the annealing sampler kinds of job files (:mod:`latflow.jobs.annealing_kinds`).

Builds the path, schedule, kernel and transport flows from a validated job, trains CRAFT flows
(``latflow train``), and writes weighted ensembles: every run is one "chain" of ``n_particles`` rows with its
``weights/log_w``, and one entry in the per-run datasets ``annealing/*`` (``log_z`` in the normalisation of the
ensemble format: compact fields under the Haar probability measure, real fields under Lebesgue measure).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latflow import checkpoint
from latflow.ensemble import EnsembleError, EnsembleWriter
from latflow.flows import model_sha256
from latflow.lattice import Lattice
from latflow.mpi import SerialComm
from latflow.rng import make_generator, stream_seed
from latflow.samplers import state_from_bytes, state_to_bytes
from latflow.samplers.annealing import (
    AIS,
    SMC,
    AdaptiveSchedule,
    CouplingPath,
    GeometricPath,
    HMCKernel,
    RandomWalkMetropolis,
    SpreadPopulation,
    StepSize,
    fixed_schedule,
)
from latflow.samplers.annealing.aft import AFT
from latflow.samplers.annealing.core import AnnealResult
from latflow.samplers.annealing.craft import CRAFT
from latflow.samplers.annealing.pimh import PIMH
from latflow.samplers.annealing.snf import SNF, Langevin
from latflow.samplers.annealing.transport import (
    TransportFlow,
    affine_transport,
    sun_spectral_transport,
    u1_equivariant_transport,
)
from latflow.theories import get_spec

from . import runner, termination  # runner imports this module too: its names are looked up at call time
from .annealing_kinds import AFTSettings, AISSettings, AnnealingSettings, CRAFTSettings, PIMHSettings, SNFSettings
from .config import JobConfig, JobError, field_manifold
from .progress import Progress
from .termination import Terminated

log = logging.getLogger("latflow")

#: sub-stream of the resampling draws that every rank of a spread population shares (beside runner.STREAM_*)
STREAM_SHARED = 101


# --- the path ------------------------------------------------------------------------------


def _dtype(job: JobConfig) -> torch.dtype:
    return runner.torch_dtype(job)


def _cast(x: torch.Tensor, job: JobConfig, device: torch.device) -> torch.Tensor:
    real = _dtype(job)
    return x.to(device=device, dtype=real.to_complex() if x.is_complex() else real)


def coupling_path(job: JobConfig, theory: Any, device: torch.device) -> CouplingPath:
    """``path = "coupling"``: the target with ``sampler.coupling`` moved from ``coupling_start`` to its value."""
    s = job.sampler
    spec = get_spec(job.theory.name)
    params = job.theory.couplings
    names = [f.name for f in dataclasses.fields(params)]
    src = job.source
    if s.coupling not in names:
        raise JobError(f"{src}: 'sampler.coupling' = {s.coupling!r}: theory {job.theory.name!r} has couplings {names}")
    lattice = Lattice(job.lattice.shape)
    c0, c1 = float(s.coupling_start), float(getattr(params, s.coupling))

    def at(c: float) -> Any:
        value: Any = c
        if isinstance(getattr(params, s.coupling), int):
            value = int(round(c))
        try:
            return spec.build(dataclasses.replace(params, **{s.coupling: value}), lattice)
        except (TypeError, ValueError) as exc:
            raise JobError(f"{src}: 'sampler.coupling_start' = {c0}: theory cannot be built there ({exc})") from None

    start = at(c0)
    sampler = getattr(start, "sample_exact", None)
    exact = getattr(start, "exact_log_z", None)
    log_z0 = exact() if callable(exact) else None
    probe = sampler(1, torch.Generator().manual_seed(0)) if callable(sampler) else None
    if probe is None or log_z0 is None:
        raise JobError(
            f"{src}: 'sampler.path' = 'coupling' needs an exactly solvable start, but theory {job.theory.name!r} at "
            f"{s.coupling} = {c0} has no exact sampler or log Z; choose 'sampler.coupling_start' where it has one "
            "(beta = 0 for gauge theories, kappa = 0 for the Schwinger model, lam = 0 for phi^4) or path = 'geometric'"
        )
    log_z0 += float(start.field_log_volume())
    cache: dict[float, Any] = {0.0: start}

    def theory_at(t: float) -> Any:
        if t not in cache:
            cache[t] = theory if t == 1.0 else at(c0 + t * (c1 - c0))
        return cache[t]

    def log_density(x: torch.Tensor, t: float) -> torch.Tensor:
        return -theory_at(t).action(x)

    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        # exact samplers draw on the CPU in float64 from a CPU stream seeded from the run's generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return _cast(start.sample_exact(n, torch.Generator().manual_seed(seed)), job, device)

    linear = None
    x = _cast(probe, job, device)
    a, b, mid = log_density(x, 0.0), log_density(x, 1.0), log_density(x, 0.5)
    if torch.allclose(mid, 0.5 * (a + b), rtol=1e-9, atol=1e-9 * float(a.abs().max() + b.abs().max() + 1)):

        def linear(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = log_density(y, 0.0)
            return a, log_density(y, 1.0) - a

    force = None
    if callable(getattr(theory, "force", None)):

        def force(y: torch.Tensor, t: float) -> torch.Tensor:
            return theory_at(t).force(y)

    return CouplingPath(draw, log_z0, log_density, linear, force)


def build_path(job: JobConfig, theory: Any, device: torch.device) -> Any:
    """The job's annealing path (``sampler.path``)."""
    if job.sampler.path == "coupling":
        return coupling_path(job, theory, device)
    prior = runner.build_model(job, device).prior
    return GeometricPath(prior, lambda x: -theory.action(x), getattr(theory, "force", None))


def build_schedule(s: AnnealingSettings) -> list[float] | AdaptiveSchedule:
    if s.schedule == "adaptive":
        return AdaptiveSchedule(s.target_cess)
    return fixed_schedule(s.n_transitions, s.schedule_power)


def build_kernel(s: AnnealingSettings, theory: Any) -> Any:
    if s.kernel == "none":
        return None
    step = StepSize(s.step_size if isinstance(s.step_size, float) else list(s.step_size))
    manifold = field_manifold(theory)
    if s.kernel == "rwm":
        return RandomWalkMetropolis(step, s.n_steps, manifold=manifold)
    return HMCKernel(
        step, s.n_steps, s.n_trajectories, integrator=s.integrator, manifold=manifold, step_jitter=s.step_jitter
    )


# --- transport flows (AFT, CRAFT) -------------------------------------------------------------

TransportFactory = Callable[[JobConfig, Lattice, torch.device], TransportFlow]


def _affine(job: JobConfig, lattice: Lattice, device: torch.device) -> TransportFlow:
    m = job.model
    return affine_transport(lattice, m.n_layers, m.hidden, m.kernel_size, dtype=_dtype(job), device=device)


def _u1(job: JobConfig, lattice: Lattice, device: torch.device) -> TransportFlow:
    m = job.model
    return u1_equivariant_transport(
        lattice, m.n_layers, m.hidden, m.kernel_size, inner=m.inner, n_bins=m.n_bins, n_mix=m.n_mix,
        dtype=_dtype(job), device=device,
    )  # fmt: skip


def _sun(job: JobConfig, lattice: Lattice, device: torch.device) -> TransportFlow:
    m = job.model
    n = int(job.theory.couplings.n)
    return sun_spectral_transport(
        lattice, n, m.n_layers, m.hidden, m.kernel_size, n_bins=m.n_bins, dtype=_dtype(job), device=device
    )


# the transport flow of each [model] kind
TRANSPORTS: dict[str, TransportFactory] = {"affine": _affine, "u1-equivariant": _u1, "sun-spectral": _sun}


def make_transport(job: JobConfig, device: torch.device) -> TransportFlow:
    """One identity-initialised transport flow of the job's ``[model]``."""
    return TRANSPORTS[job.model.kind](job, Lattice(job.lattice.shape), device)


def _flow_seed(job: JobConfig) -> int:
    from latflow.rng import stream_seed

    return stream_seed(job.run.seed, runner.STREAM_INIT)


def build_craft(job: JobConfig, theory: Any, device: torch.device) -> CRAFT:
    """CRAFT with ``n_transitions`` identity-initialised flows of ``[model]`` (weights from ``run.seed``)."""
    s = job.sampler
    assert isinstance(s, CRAFTSettings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_flow_seed(job))
        flows = [make_transport(job, device) for _ in range(s.n_transitions)]
    return CRAFT(
        build_path(job, theory, device),
        build_kernel(s, theory),
        fixed_schedule(s.n_transitions, s.schedule_power),
        flows,
        resample_threshold=s.resample_threshold,
        resampling=s.resampling,
        lr=s.lr,
        grad_clip=s.grad_clip or None,
    )


def build_annealer(job: JobConfig, theory: Any, device: torch.device) -> Any:
    """The engine object of a weighted kind: ``run(n_particles, generator, n_populations=P) -> AnnealResult``."""
    s = job.sampler
    if isinstance(s, SNFSettings):
        snf = build_snf(job, theory, device)
        load_trained(job, snf.flows, None, device)
        return snf
    if isinstance(s, CRAFTSettings) and not (isinstance(s, PIMHSettings) and s.proposal == "smc"):
        craft = build_craft(job, theory, device)
        load_trained(job, craft.flows, craft.optimizer, device)
        return craft
    path = build_path(job, theory, device)
    kernel = build_kernel(s, theory)
    if isinstance(s, AFTSettings):
        seed = _flow_seed(job)

        def make_flow() -> TransportFlow:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return make_transport(job, device)

        return AFT(
            path, kernel, fixed_schedule(s.n_transitions, s.schedule_power), make_flow,
            n_opt_steps=s.n_opt_steps, lr=s.lr, resample_threshold=s.resample_threshold, resampling=s.resampling,
        )  # fmt: skip
    if isinstance(s, AISSettings):
        return AIS(path, kernel, build_schedule(s))
    return SMC(path, kernel, build_schedule(s), resample_threshold=s.resample_threshold, resampling=s.resampling)


def build_pimh(job: JobConfig, theory: Any, device: torch.device, generator: torch.Generator, comm: SerialComm) -> PIMH:
    """``kind = "pimh"``: chains over SMC runs, or CRAFT runs with the trained flows (``proposal = "craft"``)."""
    s = job.sampler
    assert isinstance(s, PIMHSettings)
    proposal = build_annealer(job, theory, device)
    return PIMH(proposal, s.n_particles, n_chains=s.n_chains, generator=generator, chain_offset=comm.rank * s.n_chains)


def flows_sha(annealer: Any) -> str:
    """``model_sha256`` of an annealing sampler's trained flows (CRAFT, SNF); "" for samplers without them."""
    return model_sha256(annealer.flows) if isinstance(annealer, (CRAFT, SNF)) else ""


# --- CRAFT training -------------------------------------------------------------------------------


def load_trained(
    job: JobConfig, flows: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device
) -> dict[str, Any]:
    """Load trained flows (CRAFT, SNF) from ``output.model``; ``JobError`` if absent or made for another job."""
    path = job.output.model_path
    if not path.exists():
        raise JobError(f"{path}: no trained flows; train them first ('latflow run' trains and samples)")
    state = runner.read_checkpoint(job, path, device)
    flows.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return state


def save_trained(
    job: JobConfig,
    flows: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    history: dict[str, list],
    complete: bool,
    generators: dict[str, Any] | None = None,
) -> None:
    """Atomic checkpoint of trained annealing flows (CRAFT, SNF) at ``output.model``, read by :func:`load_trained`.

    ``generators``: the random state of every rank of a data-parallel run (:func:`_rank_generators`).
    """
    state = {
        "model": flows.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "generator": generator.get_state(),
        "history": history,
        "complete": complete,
        "signature": runner._model_signature(job),
        "job": job.record,
        "theory": job.theory.name,
        **(generators or {}),
    }
    checkpoint.save_atomic(state, job.output.model_path)


def _rank_generators(comm: SerialComm, gen: torch.Generator, shared: torch.Generator | None) -> dict[str, Any]:
    """The random state of a data-parallel training run for its checkpoint (collective; complete on rank 0)."""
    states = comm.gather(gen.get_state())
    out: dict[str, Any] = {"generator": gen.get_state()}
    if comm.size > 1:
        out["generators"] = states
        out["shared_generator"] = shared.get_state() if shared is not None else None
    return out


def _restore_generators(
    path: Path, state: dict[str, Any], comm: SerialComm, gen: torch.Generator, shared: torch.Generator | None
) -> None:
    """Put back the random state written by :func:`_rank_generators`; ``JobError`` on another number of ranks."""
    ranks = len(state.get("generators") or [None])
    if ranks != comm.size:
        raise JobError(f"{path}: trained on {ranks} rank(s); resume the training with the same number of ranks")
    gen.set_state(state["generators"][comm.rank] if comm.size > 1 else state["generator"])
    if shared is not None and state.get("shared_generator") is not None:
        shared.set_state(state["shared_generator"])


def train_craft(job: JobConfig, *, resume: bool, comm: SerialComm, device: torch.device, theory: Any) -> Path:
    """``n_iterations`` CRAFT iterations, checkpointed to ``output.model``.

    Under MPI the training is data-parallel: each iteration's ``train_particles`` particles are spread over the
    ranks (:class:`~latflow.samplers.annealing.population.SpreadPopulation`: global weights, ESS, resampling
    and ``log Z``; the flows' gradients summed over ranks), so every rank holds the same flows, and R ranks run
    the serial algorithm on the same number of particles R times faster (up to communication).

    The checkpoint holds the flows (``model``), the optimiser, the iteration (``step``), every rank's generator
    state and the history of per-iteration ``log Z`` estimates and ESS; ``--resume`` continues it bit for bit
    (with the same number of ranks). A stop signal (SIGTERM, SIGUSR1) ends the run after the iteration in
    progress, with a checkpoint of that iteration.
    """
    s = job.sampler
    assert isinstance(s, CRAFTSettings)
    path = job.output.model_path
    n = s.train_particles or s.n_particles
    population = None
    if comm.size > 1:
        if n < comm.size:
            raise JobError(
                f"{job.source}: 'sampler.train_particles' = {n}: CRAFT training spreads its particles over the "
                f"{comm.size} ranks and needs at least one per rank"
            )
        population = SpreadPopulation(comm, n, stream_seed(job.run.seed, runner.STREAM_TRAIN, STREAM_SHARED))
    shared = population.shared_generator if population is not None else None
    craft = build_craft(job, theory, device)
    gen = make_generator(job.run.seed, runner.STREAM_TRAIN, comm.rank, device=device)
    history: dict[str, list] = {"log_z": [], "ess": [], "loss": []}
    if resume and path.exists():
        state = load_trained(job, craft.flows, craft.optimizer, device)
        craft.iteration = int(state.get("step", 0))
        _restore_generators(path, state, comm, gen, shared)
        history = {k: list(v) for k, v in state.get("history", history).items()}
        if comm.is_root:
            log.info("resuming CRAFT training from %s at iteration %d", path, craft.iteration)
    comm.barrier()  # every rank has read the checkpoint before rank 0 replaces it
    every = max(1, min(50, s.n_iterations // 10 or 1))
    volume = float(getattr(theory, "field_log_volume", lambda: 0.0)())
    bar = Progress(s.n_iterations, "craft", every=every, enabled=comm.is_root, initial=craft.iteration)

    def save(complete: bool) -> None:
        generators = _rank_generators(comm, gen, shared)
        if comm.is_root:
            save_trained(job, craft.flows, craft.optimizer, craft.iteration, gen, history, complete, generators)
        comm.barrier()  # no rank goes on (or ends the job) before the checkpoint is complete

    try:
        with termination.deferred():
            while craft.iteration < s.n_iterations:
                r = craft.train_iteration(n, gen, population=population)
                lz = float(r.log_z[0]) - volume
                history["log_z"].append(lz)
                history["ess"].append(float(r.final_ess()[0]))
                history["loss"].append(float(np.sum(r.extra["loss"])))
                bar.update(1, log_z=lz, loss=history["loss"][-1])
                if not all(math.isfinite(v) for v in r.extra["loss"]):
                    raise JobError(f"{path}: CRAFT training diverged at iteration {craft.iteration} (non-finite loss)")
                signum = termination.agreed(comm)
                if signum is not None:
                    save(False)
                    if comm.is_root:
                        log.info("stopped by %s: checkpoint %s written at iteration %d",
                                 termination.signal_name(signum), path, craft.iteration)  # fmt: skip
                    comm.barrier()  # the line above is written before any rank ends the job
                    raise Terminated(signum, everywhere=True)
                if craft.iteration % max(1, job.train.checkpoint_every) == 0:
                    save(False)
    finally:
        bar.close()
    save(True)
    k = min(len(history["log_z"]), 20)
    if k and comm.is_root:
        log.info(
            "CRAFT: %d iterations on %d rank(s); last %d: log Z %.4f (mean), ESS %.3f (mean)", craft.iteration,
            comm.size, k, float(np.mean(history["log_z"][-k:])), float(np.mean(history["ess"][-k:])),
        )  # fmt: skip
    comm.barrier()
    return path


def build_snf(job: JobConfig, theory: Any, device: torch.device) -> SNF:
    """A stochastic normalising flow of ``n_transitions`` blocks (flows of ``[model]``, weights from ``run.seed``)."""
    s = job.sampler
    assert isinstance(s, SNFSettings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_flow_seed(job))
        flows = [make_transport(job, device) for _ in range(s.n_transitions)]
    step = StepSize(s.step_size if isinstance(s.step_size, float) else list(s.step_size))
    manifold = field_manifold(theory)
    if s.kernel == "langevin":
        if manifold.name != "real":
            raise JobError(f"{job.source}: 'sampler.kernel' = 'langevin' needs real fields; use 'rwm' or 'hmc'")
        stochastic: Any = Langevin(step, s.n_steps)
    elif s.kernel == "rwm":
        stochastic = RandomWalkMetropolis(step, s.n_steps, manifold=manifold)
    else:
        stochastic = HMCKernel(
            step, s.n_steps, s.n_trajectories, integrator=s.integrator, manifold=manifold, step_jitter=s.step_jitter
        )
    return SNF(build_path(job, theory, device), flows, stochastic, fixed_schedule(s.n_transitions, s.schedule_power))


def train_snf(job: JobConfig, *, resume: bool, comm: SerialComm, device: torch.device, theory: Any) -> Path:
    """Train an SNF by its path-space reverse KL (``[train]``: steps, batch_size, lr), checkpointed.

    Under MPI the training is data-parallel like the flows' (:class:`latflow.training.ReverseKLTrainer`): every
    rank draws ``batch_size`` paths from its own stream and the gradients are averaged over ranks. ``--resume``
    continues bit for bit (same number of ranks); a stop signal ends the run after the step in progress, with a
    checkpoint of that step.
    """
    t = job.train
    path = job.output.model_path
    snf = build_snf(job, theory, device)
    params = list(snf.parameters())
    comm.bcast_parameters_(params)
    opt = torch.optim.Adam(params, lr=t.lr)
    gen = make_generator(job.run.seed, runner.STREAM_TRAIN, comm.rank, device=device)
    step, history = 0, {"loss": []}
    if resume and path.exists():
        state = load_trained(job, snf.flows, opt, device)
        step, history = int(state.get("step", 0)), {k: list(v) for k, v in state.get("history", history).items()}
        _restore_generators(path, state, comm, gen, None)
    comm.barrier()  # every rank has read the checkpoint before rank 0 replaces it
    bar = Progress(t.steps, "snf", every=t.log_every, enabled=comm.is_root, initial=step)

    def save(complete: bool) -> None:
        generators = _rank_generators(comm, gen, None)
        if comm.is_root:
            save_trained(job, snf.flows, opt, step, gen, history, complete, generators)
        comm.barrier()  # no rank goes on (or ends the job) before the checkpoint is complete

    try:
        with termination.deferred():
            while step < t.steps:
                opt.zero_grad(set_to_none=True)
                loss = snf.loss(t.batch_size, gen)
                loss.backward()
                if comm.size > 1:
                    for q in params:
                        if q.grad is None:  # the same buffer layout on every rank
                            q.grad = torch.zeros_like(q)
                mean = loss.detach().reshape(1).clone()
                comm.allreduce_mean_([mean, *(q.grad for q in params if q.grad is not None)])  # one rank: no-op
                loss_value = float(mean)
                if not math.isfinite(loss_value):
                    raise JobError(f"{path}: SNF training diverged at step {step} (non-finite loss)")
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                opt.step()
                step += 1
                history["loss"].append(loss_value)
                bar.update(1, loss=loss_value)
                signum = termination.agreed(comm)
                if signum is not None:
                    save(False)
                    if comm.is_root:
                        log.info("stopped by %s: checkpoint %s written at step %d",
                                 termination.signal_name(signum), path, step)  # fmt: skip
                    comm.barrier()  # the line above is written before any rank ends the job
                    raise Terminated(signum, everywhere=True)
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    save(False)
    finally:
        bar.close()
    save(True)
    comm.barrier()
    return path


# --- weighted ensembles ---------------------------------------------------------------------------


def run_rows(theory: Any, result: AnnealResult, first_run: int, measure: Callable) -> tuple[dict, dict]:
    """Ensemble rows and per-run entries of the populations of ``result`` (run ids from ``first_run``).

    Spread over ranks, the rows are this rank's particles (``markov/step`` their index in the run) and the
    per-run entries are global (the same on every rank).
    """
    p, n = result.n_populations, result.n_particles
    chain = np.repeat(np.arange(first_run, first_run + p, dtype=np.int64), n)
    volume = float(getattr(theory, "field_log_volume", lambda: 0.0)())
    x = result.x.detach()
    rows = {
        f"fields/{theory.field_name}": x.cpu().numpy(),
        "markov/chain": chain,
        "markov/step": np.tile(np.arange(result.first_particle, result.first_particle + n, dtype=np.int64), p),
        "markov/accepted": np.ones(p * n, dtype=bool),
        "weights/log_p": result.log_p.detach().double().cpu().numpy(),
        "weights/log_q": np.zeros(p * n),
        "weights/log_w": result.log_w.detach().double().reshape(-1).cpu().numpy(),
    }
    rows.update(measure(theory, x))
    runs = {
        "annealing/log_z": result.log_z.detach().double().cpu().numpy() - volume,
        "annealing/ess": result.final_ess().double().cpu().numpy(),
        "annealing/n_particles": np.full(p, result.n_total, dtype=np.int64),
        "annealing/chain": np.arange(first_run, first_run + p, dtype=np.int64),
        "annealing/n_resample": result.n_resampled().cpu().numpy().astype(np.int64),
        # the final weights are uniform after a last resampling: the ESS met along the way says more
        "annealing/ess_min": torch.stack(result.ess).min(0).values.double().cpu().numpy() if result.ess else np.ones(p),
        "annealing/n_transitions": np.full(p, len(result.ts) - 1, dtype=np.int64),
    }
    return rows, runs


def _join_particle_slices(parts: list[np.ndarray], p: int) -> np.ndarray:
    """Rows of ``p`` runs ``[p * N, ...]`` (run-major) from each rank's slice ``[p * n_r, ...]``, in rank order."""
    shaped = [x.reshape(p, -1, *x.shape[1:]) for x in parts]
    joined = np.concatenate(shaped, axis=1)
    return joined.reshape(-1, *joined.shape[2:])


def sample_weighted(
    job: JobConfig,
    theory: Any,
    device: torch.device,
    *,
    comm: SerialComm,
    open_writer: Callable[[str], tuple[EnsembleWriter, bytes | None]],
    measure: Callable,
) -> Path:
    """Write ``n_samples`` independent runs of a weighted kind, ``commit_every`` runs per pass and commit.

    ``sampler.parallel = "runs"``: each rank runs its own passes (its own random stream); rank 0 gathers and
    writes. ``"particles"``: every rank holds its share of every run's particles
    (:class:`~latflow.samplers.annealing.population.SpreadPopulation`), all ranks run the same passes, and rank 0
    gathers the shares in particle order. ``--resume`` continues after the last committed pass with the
    generator states stored with it.
    """
    s = job.sampler
    annealer = build_annealer(job, theory, device)
    sha = flows_sha(annealer)
    gen = make_generator(job.run.seed, runner.STREAM_SAMPLE, comm.rank, device=device)
    population = None
    if getattr(s, "parallel", "runs") == "particles" and comm.size > 1:
        if s.n_particles < comm.size:
            raise JobError(
                f"{job.source}: 'sampler.n_particles' = {s.n_particles}: parallel = 'particles' needs at least one "
                f"particle per rank ({comm.size} ranks)"
            )
        population = SpreadPopulation(
            comm, s.n_particles, stream_seed(job.run.seed, runner.STREAM_SAMPLE, STREAM_SHARED)
        )
    runs_per_pass = 1 if population is not None else comm.size  # runs one pass of every rank adds
    writer, blob, error = None, None, ""
    if comm.is_root:
        try:
            writer, blob = open_writer(sha)
        except (JobError, EnsembleError) as exc:
            error = str(exc)
    blob, error = comm.bcast((blob, error))
    if error:
        raise JobError(error)
    done = 0
    if blob is not None:
        state = state_from_bytes(blob)
        if len(state["ranks"]) != comm.size:
            raise JobError(
                f"{job.output.path}: written by {len(state['ranks'])} rank(s); resume it with the same number"
            )
        gen.set_state(state["ranks"][comm.rank]["generator"])
        if population is not None:
            population.shared_generator.set_state(state["ranks"][comm.rank]["shared_generator"])
        done = int(state["recorded"])
    bar = Progress(s.n_samples, s.kind, every=1, enabled=comm.is_root, initial=done)
    try:
        while done < s.n_samples:
            p = max(1, min(s.commit_every, math.ceil((s.n_samples - done) / runs_per_pass)))
            if population is None:
                result = annealer.run(s.n_particles, gen, n_populations=p)
                first = done + comm.rank * p
            else:
                result = annealer.run(s.n_particles, gen, n_populations=p, population=population)
                first = done
            rows, runs = run_rows(theory, result, first, measure)
            rank_state = {"generator": gen.get_state()}
            if population is not None:
                rank_state["shared_generator"] = population.shared_generator.get_state()
            gathered = comm.gather((rows, runs, rank_state))
            done += p * runs_per_pass
            if comm.is_root:
                assert gathered is not None and writer is not None
                if population is None:
                    merged = {k: np.concatenate([g[0][k] for g in gathered]) for k in rows}
                    merged_runs = {k: np.concatenate([g[1][k] for g in gathered]) for k in runs}
                else:  # every rank holds a slice of each run: put the runs' particles back in order
                    merged = {k: _join_particle_slices([g[0][k] for g in gathered], p) for k in rows}
                    merged_runs = runs  # global per-run values, the same on every rank
                blob = state_to_bytes({"ranks": [g[2] for g in gathered], "recorded": done})
                writer.append(merged, blob, runs=merged_runs)
                bar.update(p * runs_per_pass, log_z=float(np.mean(merged_runs["annealing/log_z"])),
                           ess=float(np.mean(merged_runs["annealing/ess"])))  # fmt: skip
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return Path(job.output.path)
