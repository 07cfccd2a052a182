"""Communication against compute at up to 1000 GPUs, on paper: training steps and SMC/CRAFT resampling.

The package's real flows are built from its example job files at production lattice sizes (through
``latflow.jobs``: ``build_model``, ``build_theory``, the training action, ``make_transport``, ``build_kernel``),
their parameters and field bytes counted, and one training step (and one SMC/CRAFT transition) timed on this
CPU. A stated CPU -> GPU factor and a per-op floor turn the CPU times into GPU times; an alpha-beta model of
NVLink inside a node and InfiniBand NDR between nodes gives the communication. docs/SCALING.md explains the
model and reads the tables.

GPU time of ``B`` samples (``c``: CPU seconds per sample from a fit ``t(B) = t0 + c B`` at two batch sizes,
``n_ops``: torch ops dispatched per step, counted)::

    t_gpu(B) = max(c B / speedup, n_ops * op_time)

Allreduce of ``S`` bytes over ``R`` ranks, ``g`` GPUs per node, ``n = R / g`` nodes (hierarchical: reduce-scatter
and allgather inside the node on NVLink, allreduce of the ``S / g`` shards between nodes on InfiniBand)::

    T = 2 (g-1)/g S / bw_nvl + 2 (g-1) a_nvl + 2 (n-1)/n (S/g) / bw_ib + lat(n),
    lat(n) = 2 (n-1) a_ib (ring) or 2 ceil(log2 n) a_ib (tree / recursive doubling)

Usage::

    python benchmarks/scaling_model.py                  # production sizes; 3-7 minutes on one core
    python benchmarks/scaling_model.py --quick          # tiny lattices, seconds: checks the script runs
    python benchmarks/scaling_model.py --speedup 100 --op-time 1e-5 --json scaling.json
    python benchmarks/scaling_model.py --from-json scaling.json --speedup 1000   # other assumptions, no timing
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from latflow.fermions.training_target import training_action
from latflow.jobs import annealing, runner
from latflow.jobs.config import load_job
from latflow.rng import make_generator
from latflow.samplers.annealing.flow_transitions import transition_kl
from latflow.samplers.annealing.resampling import systematic
from latflow.training import ReverseKLTrainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "jobs" / "examples"
RANKS = (8, 64, 1000)
CPU = torch.device("cpu")


# --- machine model ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One kind of link: latency ``alpha`` (s per message step) and bandwidth (bytes/s per GPU, one direction)."""

    alpha: float
    bandwidth: float


@dataclass(frozen=True)
class Machine:
    """The assumed GPU cluster (defaults: 8 x H200 per node, NVLink/NVSwitch, one NDR 400 Gb/s port per GPU).

    Attributes
    ----------
    nvlink, ib
        Intra-node and inter-node links.
    pcie
        Host <-> GPU copy bandwidth (bytes/s), for gradients staged through the host.
    gpus_per_node
        GPUs sharing NVLink.
    speedup
        GPU throughput over one core of this CPU on the same torch operations (large batches).
    op_time
        Host time per dispatched torch op on the GPU host (eager mode): the floor of a step at small batches.
    memory
        Usable GPU memory (bytes) for fields and activations.
    """

    nvlink: Link = Link(3e-6, 400e9)
    ib: Link = Link(5e-6, 45e9)
    pcie: float = 50e9
    gpus_per_node: int = 8
    speedup: float = 300.0
    op_time: float = 5e-6
    memory: float = 120e9


def _log2(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def allreduce_time(nbytes: float, ranks: int, m: Machine, latency: str = "tree") -> float:
    """Seconds of a hierarchical allreduce of ``nbytes`` over ``ranks`` GPUs (module docstring).

    ``latency``: ``"tree"`` (``2 log2 n`` message steps between nodes) or ``"ring"`` (``2 (n - 1)``).
    """
    if ranks <= 1:
        return 0.0
    g = min(ranks, m.gpus_per_node)
    n = math.ceil(ranks / g)
    t = 2 * (g - 1) / g * nbytes / m.nvlink.bandwidth + 2 * (g - 1) * m.nvlink.alpha
    if n > 1:
        steps = 2 * _log2(n) if latency == "tree" else 2 * (n - 1)
        t += 2 * (n - 1) / n * (nbytes / g) / m.ib.bandwidth + steps * m.ib.alpha
    return t


def flat_ring_time(nbytes: float, ranks: int, m: Machine) -> float:
    """A single ring over all ``ranks`` GPUs, every step at InfiniBand speed (no node hierarchy)."""
    if ranks <= 1:
        return 0.0
    link = m.nvlink if ranks <= m.gpus_per_node else m.ib
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + 2 * (ranks - 1) * link.alpha


def host_staged_time(n_params: int, ranks: int, m: Machine) -> float:
    """Allreduce as ``latflow.mpi.MPIComm.allreduce_mean_`` does it: float64 host buffer (GPU -> host -> GPU copies),
    MPI allreduce (hierarchical, tree latency), plus the step's separate allreduce of the two loss statistics."""
    if ranks <= 1:
        return 0.0
    s64 = 8.0 * n_params
    return 2 * s64 / m.pcie + allreduce_time(s64, ranks, m) + allreduce_time(16.0, ranks, m)


def allgather_time(total_bytes: float, ranks: int, m: Machine) -> float:
    """Hierarchical allgather: every GPU ends with ``total_bytes`` (all ranks' parts together)."""
    if ranks <= 1:
        return 0.0
    g = min(ranks, m.gpus_per_node)
    n = math.ceil(ranks / g)
    t = (g - 1) / g * total_bytes / m.nvlink.bandwidth + _log2(g) * m.nvlink.alpha
    if n > 1:  # each node fetches the other nodes' (n - 1)/n of the data over its g ports
        t += (n - 1) / n * total_bytes / (g * m.ib.bandwidth) + _log2(n) * m.ib.alpha
    return t


# --- measurements on this CPU -----------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched while active (about one GPU kernel each)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (activation memory)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def field_bytes(theory: Any, dtype: torch.dtype, links_complex: bool) -> int:
    """Bytes of one configuration: ``theory.field_shape`` (``[d, L..., N, N]`` complex for SU(N), real otherwise)."""
    numel = math.prod(theory.field_shape)
    item = torch.empty((), dtype=dtype).element_size()
    return numel * item * (2 if links_complex else 1)


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Process CPU seconds per call of ``fn`` (one torch thread: CPU time is less affected by other processes
    sharing the cores than wall time)."""
    t0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - t0) / repeats


@dataclass(frozen=True)
class TrainCase:
    """A training configuration: an example job file at a production lattice.

    Attributes
    ----------
    key, label
        Short name and description.
    job, sets
        Example job file and ``--set`` overrides.
    batch
        Batch per rank (GPU) in production.
    measure
        Two batch sizes timed on this CPU (the fit ``t(B) = t0 + c B``); one entry: ``c = t(B) / B``.
    volume_factor
        Production volume over the measured one (> 1: compute extrapolated linearly in the volume).
    note
        What was chosen.
    """

    key: str
    label: str
    job: str
    sets: tuple[str, ...]
    batch: int
    measure: tuple[int, ...]
    volume_factor: float = 1.0
    note: str = ""


def train_cases(quick: bool) -> list[TrainCase]:
    """The largest flows of the package at production sizes (``quick``: tiny lattices)."""
    if quick:
        return [
            TrainCase(
                "phi4", "phi^4 2D L=8, affine 8x[8,8]", "phi4_default.toml", ("lattice.shape=[8,8]",), 64, (1, 2)
            ),
            TrainCase(
                "su3-4d",
                "SU(3) 4D 4^4, spectral 4x[8]",
                "su3_flow.toml",
                ("lattice.shape=[4,4,4,4]", "model.n_layers=4", "model.hidden=[8]"),
                2,
                (1,),
            ),
        ]
    su3_4d = ("model.n_layers=32", "model.hidden=[8,8]")
    return [
        TrainCase(
            "phi4-64", "phi^4 2D L=64, affine 8x[8,8]", "phi4_default.toml", ("lattice.shape=[64,64]",), 64, (4, 16)
        ),
        TrainCase(
            "u1-64", "U(1) 2D L=64, equivariant 16x[8,8] spline", "u1_flow.toml", ("lattice.shape=[64,64]",), 64, (2, 8)
        ),
        TrainCase(
            "schwinger-64",
            "Schwinger 2D L=64, equivariant 16x[8] (gauge action)",
            "schwinger_pf_flow.toml",
            ("lattice.shape=[64,64]",),
            64,
            (2, 8),
        ),
        TrainCase(
            "su3-2d-32", "SU(3) 2D L=32, spectral 8x[8]", "su3_flow.toml", ("lattice.shape=[32,32]",), 64, (4, 16)
        ),
        TrainCase(
            "su3-4d-8",
            "SU(3) 4D 8^4, spectral 32x[8,8]",
            "su3_flow.toml",
            ("lattice.shape=[8,8,8,8]", *su3_4d),
            8,
            (1, 2),
        ),
        TrainCase(
            "su3-4d-16",
            "SU(3) 4D 16^4, spectral 32x[8,8] (from 8^4 x 16)",
            "su3_flow.toml",
            ("lattice.shape=[8,8,8,8]", *su3_4d),
            2,
            (1, 2),
            volume_factor=16.0,
            note="timed at 8^4, compute and activations scaled by the volume ratio 16",
        ),
        TrainCase(
            "su3-4d-16w",
            "SU(3) 4D 16^4, spectral 32x[32,32] (wide, from 8^4 x 16)",
            "su3_flow.toml",
            ("lattice.shape=[8,8,8,8]", "model.n_layers=32", "model.hidden=[32,32]"),
            2,
            (1,),
            volume_factor=16.0,
            note="a 4x wider conditioner (stress case for the allreduce); timed at 8^4 with batch 1",
        ),
    ]


@dataclass
class TrainResult:
    """What one training case measured (CPU) and its derived sizes."""

    key: str
    label: str
    lattice: list[int]
    batch: int
    n_params: int
    field_bytes: int
    cpu_t0: float
    cpu_per_sample: float
    n_ops: int
    act_bytes_per_sample: float
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _job(case_job: str, sets: Sequence[str], text: str | None = None) -> Any:
    return load_job(EXAMPLES / case_job if text is None else case_job, list(sets), text=text)


_MEASURED: dict[tuple[str, tuple[str, ...], tuple[int, ...]], TrainResult] = {}


def measure_training(case: TrainCase, log: Callable[[str], None]) -> TrainResult:
    """Parameters, field bytes, ops per step, activation bytes and CPU seconds of ``ReverseKLTrainer.train_step``
    (a case with the same job, overrides and batches as an earlier one reuses its measurement)."""
    known = _MEASURED.get((case.job, case.sets, case.measure))
    if known is None:
        known = _MEASURED[(case.job, case.sets, case.measure)] = _measure_training(case)
    vf = case.volume_factor
    res = replace(
        known, key=case.key, label=case.label, batch=case.batch, field_bytes=int(known.field_bytes * vf),
        cpu_per_sample=known.cpu_per_sample * vf, act_bytes_per_sample=known.act_bytes_per_sample * vf, note=case.note,
    )  # fmt: skip
    log(
        f"  {case.key}: {res.n_params} params, {res.field_bytes / 1e6:.3g} MB/config, {res.n_ops} ops/step, "
        f"CPU {res.cpu_per_sample:.3g} s/sample (+{res.cpu_t0:.3g} s/step), activations "
        f"{res.act_bytes_per_sample / 1e9:.3g} GB/sample"
    )
    return res


def _measure_training(case: TrainCase) -> TrainResult:
    job = _job(case.job, case.sets)
    theory = runner.build_theory(job)
    model = runner.build_model(job, CPU)
    gen = make_generator(job.run.seed, 2, 0)
    action = training_action(theory, job.sampler.kind, job.train.target, estimator=job.train.estimator, generator=gen)
    dtype = next(model.parameters()).dtype
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fbytes = field_bytes(theory, dtype, job.model.kind == "sun-spectral")

    def trainer(batch: int) -> ReverseKLTrainer:
        return ReverseKLTrainer(model, lambda x: -action(x), batch_size=batch, lr=1e-4, generator=gen)

    first = trainer(case.measure[0])
    counter = OpCounter()
    with counter:  # warm-up step, counted
        first.train_step()
    times = {}
    act = 0.0
    for b in case.measure:
        tr = first if b == case.measure[0] else trainer(b)
        t0, w0 = time.process_time(), time.perf_counter()
        nb = saved_bytes(tr.train_step)
        times[str(b)] = time.process_time() - t0
        times[f"wall_{b}"] = time.perf_counter() - w0
        act = nb / b
    if len(case.measure) >= 2:
        b1, b2 = case.measure[0], case.measure[-1]
        c = (times[str(b2)] - times[str(b1)]) / (b2 - b1)
        t0_fit = max(times[str(b1)] - c * b1, 0.0)
        if c <= 0:  # timing noise at tiny sizes
            c, t0_fit = times[str(b2)] / b2, 0.0
    else:
        b = case.measure[0]
        c, t0_fit = times[str(b)] / b, 0.0
    return TrainResult(
        key=case.key, label=case.label, lattice=list(job.lattice.shape), batch=case.batch, n_params=n_params,
        field_bytes=fbytes, cpu_t0=t0_fit, cpu_per_sample=c, n_ops=counter.n, act_bytes_per_sample=act,
        timings=times,
    )  # fmt: skip


def gpu_step_time(r: TrainResult, batch: int, m: Machine) -> float:
    """Model GPU seconds of one training step of ``batch`` samples (module docstring)."""
    return max(r.cpu_per_sample * batch / m.speedup, r.n_ops * m.op_time)


def max_batch(r: TrainResult, m: Machine) -> int:
    """Largest batch whose activations (and fields) fit the GPU memory."""
    return max(int(m.memory // (r.act_bytes_per_sample + 4 * r.field_bytes)), 0)


def batch_for(r: TrainResult, t_comm: float, m: Machine, ratio: float) -> float:
    """Smallest batch per GPU whose step compute is ``ratio`` times ``t_comm`` (0: the per-op floor already is;
    ``ratio`` 1: communication can hide behind compute, 9: 90% efficiency without overlap)."""
    if r.n_ops * m.op_time >= ratio * t_comm:
        return 0.0
    return ratio * t_comm * m.speedup / r.cpu_per_sample


def training_table(results: Sequence[TrainResult], m: Machine) -> list[dict[str, Any]]:
    """Per case and rank count: compute, communication (three allreduce models) and efficiency."""
    rows = []
    for r in results:
        b = min(r.batch, max_batch(r, m)) or 1
        t_comp = gpu_step_time(r, b, m)
        floor = r.n_ops * m.op_time
        for ranks in RANKS:
            s32 = 4.0 * r.n_params
            t_tree = allreduce_time(s32, ranks, m, "tree")
            t_ring = allreduce_time(s32, ranks, m, "ring")
            t_flat = flat_ring_time(s32, ranks, m)
            t_host = host_staged_time(r.n_params, ranks, m)
            # bytes of fp32 gradients whose (tree) allreduce would cost as much as the step's compute
            per_byte = (allreduce_time(2e9, ranks, m) - allreduce_time(1e9, ranks, m)) / 1e9
            rows.append({
                "key": r.key, "ranks": ranks, "batch": b, "t_comp": t_comp, "t_floor": floor,
                "grad_mb_fp32": s32 / 1e6, "t_tree": t_tree, "t_ring": t_ring, "t_flat": t_flat, "t_host": t_host,
                "eff_tree": t_comp / (t_comp + t_tree), "eff_flat": t_comp / (t_comp + t_flat),
                "eff_host": t_comp / (t_comp + t_host), "b_equal": batch_for(r, t_tree, m, 1.0),
                "b90_tree": batch_for(r, t_tree, m, 9.0), "b90_flat": batch_for(r, t_flat, m, 9.0),
                "b90_host": batch_for(r, t_host, m, 9.0), "params_equal": t_comp / per_byte / 4.0,
            })  # fmt: skip
    return rows


# --- SMC / CRAFT --------------------------------------------------------------------------------------------------

SU3_CRAFT = """
[theory]
name = "su3"
beta = 6.0
[lattice]
shape = [8, 8, 8, 8]
[model]
kind = "sun-spectral"
n_layers = 8
hidden = [8]
[sampler]
kind = "craft"
n_samples = 16
commit_every = 8
n_particles = 64
path = "geometric"
n_transitions = 10
kernel = "hmc"
step_size = 0.1
n_steps = 4
n_trajectories = 1
integrator = "omelyan"
n_iterations = 10
[output]
path = "su3_craft.h5"
"""


def _u1_craft_text() -> str:
    text = (EXAMPLES / "u1_smc.toml").read_text(encoding="utf-8")
    model = '[model]\nkind = "u1-equivariant"\nn_layers = 8\nhidden = [8, 8]\ninner = "spline"\n\n'
    return text.replace('[sampler]\nkind = "smc"', model + '[sampler]\nkind = "craft"\nn_iterations = 10')


@dataclass(frozen=True)
class SMCCase:
    """An SMC/CRAFT transition: job (file or text), overrides, particles timed on this CPU."""

    key: str
    label: str
    job: str
    sets: tuple[str, ...]
    n_time: int
    text: str | None = None
    volume_factor: float = 1.0


def smc_cases(quick: bool) -> list[SMCCase]:
    if quick:
        return [SMCCase("phi4-14", "phi^4 14x14, CRAFT example", "phi4_craft.toml", (), 8)]
    return [
        SMCCase("phi4-14", "phi^4 14x14 (CRAFT example: 2 affine, 2x10 leapfrog)", "phi4_craft.toml", (), 64),
        SMCCase("phi4-64", "phi^4 64x64 (same flow and kernel)", "phi4_craft.toml", ("lattice.shape=[64,64]",), 16),
        SMCCase(
            "u1-64", "U(1) 64x64 (u1_smc kernel 1x4 Omelyan; 8 equivariant [8,8])", "u1_craft.toml",
            ("lattice.shape=[64,64]",), 16, text=_u1_craft_text(),
        ),
        SMCCase("su3-8", "SU(3) 4D 8^4 (8 spectral [8]; 1x4 Omelyan)", "su3_craft.toml", (), 2, text=SU3_CRAFT),
        SMCCase(
            "su3-16", "SU(3) 4D 16^4 (from 8^4 x 16)", "su3_craft.toml", (), 2, text=SU3_CRAFT, volume_factor=16.0
        ),
    ]  # fmt: skip


@dataclass
class SMCResult:
    key: str
    label: str
    field_bytes: int
    transport_params: int
    cpu_flow_train: float
    cpu_flow: float
    cpu_kernel: float
    n_ops: int
    act_bytes_per_particle: float


def measure_smc(case: SMCCase, log: Callable[[str], None]) -> SMCResult:
    """CPU seconds per particle of one transition: transport (forward; forward + backward for CRAFT) and kernel."""
    job = _job(case.job, case.sets, case.text)
    theory = runner.build_theory(job)
    path = annealing.build_path(job, theory, CPU)
    flow = annealing.make_transport(job, CPU)
    kernel = annealing.build_kernel(job.sampler, theory)
    gen = make_generator(1, 5, 0)
    n = case.n_time
    x = path.sample_initial(n, gen)
    dtype = x.real.dtype
    fbytes = field_bytes(theory, dtype, x.is_complex())
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    n_params = sum(p.numel() for p in flow.parameters())

    def craft_step() -> None:
        loss, _, _ = transition_kl(flow, path, x, w, 0.4, 0.5)
        loss.backward()

    def frozen() -> None:
        with torch.no_grad():
            flow(x)

    def move() -> None:
        kernel.move(x, lambda z: path.log_gamma(z, 0.5), 0.5, gen)

    counter = OpCounter()
    with counter:
        craft_step()
        move()
    act = saved_bytes(craft_step) / n
    t_train, t_fwd, t_ker = (_timed(f, 1) / n for f in (craft_step, frozen, move))
    vf = case.volume_factor
    res = SMCResult(
        key=case.key, label=case.label, field_bytes=int(fbytes * vf), transport_params=n_params,
        cpu_flow_train=t_train * vf, cpu_flow=t_fwd * vf, cpu_kernel=t_ker * vf, n_ops=counter.n,
        act_bytes_per_particle=act * vf,
    )  # fmt: skip
    log(
        f"  {case.key}: {fbytes * vf / 1e6:.3g} MB/particle, transport {n_params} params, CPU per particle: "
        f"CRAFT flow {res.cpu_flow_train:.3g} s, frozen flow {res.cpu_flow:.3g} s, kernel {res.cpu_kernel:.3g} s, "
        f"{counter.n} ops/transition"
    )
    return res


def simulate_resampling(
    n_per_rank: int, ranks: int, ess: float, rng: np.random.Generator, repeats: int = 3
) -> dict[str, float]:
    """Systematic resampling (:func:`latflow.samplers.annealing.resampling.systematic`) of ``N = n_per_rank * ranks``
    log-normal weights with ``E[ESS/N] = ess``.

    Particles sit on ranks in contiguous blocks of ``n_per_rank``. Two ways to place the offspring:

    * ``contiguous``: slot ``j`` of the resampled population lives on rank ``j // n_per_rank`` (the layout of a
      population split into contiguous slices, as before resampling); a slot whose ancestor lives elsewhere moves.
    * ``balanced``: every rank keeps its own particles' offspring (up to ``n_per_rank``) and only the surplus moves
      to ranks with a deficit (the fewest moves that restore equal loads).

    Returns
    -------
    dict
        Fractions of the ``N`` particles that change rank, the largest number any one rank receives, and the
        realised ESS fraction (means over ``repeats``).
    """
    sigma = math.sqrt(-math.log(ess))
    n_total = n_per_rank * ranks
    out = {"ess_realised": 0.0, "moved_contiguous": 0.0, "moved_balanced": 0.0, "max_recv_contiguous": 0.0,
           "max_recv_balanced": 0.0}  # fmt: skip
    for _ in range(repeats):
        log_w = sigma * rng.standard_normal(n_total)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        anc = systematic(torch.from_numpy(log_w)[None], gen)[0].numpy()  # the package's resampler, one population
        src = anc // n_per_rank
        dst = np.arange(n_total) // n_per_rank
        moved = src != dst
        per_rank = np.bincount(src, minlength=ranks)  # offspring of each rank's particles
        deficit = np.maximum(n_per_rank - per_rank, 0)
        out["ess_realised"] += 1.0 / (n_total * np.sum(w**2))
        out["moved_contiguous"] += moved.mean()
        out["max_recv_contiguous"] += np.bincount(dst[moved], minlength=ranks).max()
        out["moved_balanced"] += deficit.sum() / n_total
        out["max_recv_balanced"] += deficit.max()
    return {k: v / repeats for k, v in out.items()}


def smc_table(
    results: Sequence[SMCResult], moves: dict[tuple[int, float], dict[str, float]], m: Machine,
    n_per_rank: Sequence[int], ranks: int, ess: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per case and particles per rank at ``ranks``: compute and communication of one transition that resamples."""
    rows = []
    for r in results:
        for n in n_per_rank:
            mv = moves[(n, ess)]
            t_craft = max(n * (r.cpu_flow_train + r.cpu_kernel) / m.speedup, r.n_ops * m.op_time)
            t_smc = max(n * (r.cpu_flow + r.cpu_kernel) / m.speedup, r.n_ops * m.op_time)
            t_ess = allreduce_time(16.0, ranks, m)  # sum w, sum w^2 (and log Z) of one population
            t_gather = allgather_time(8.0 * n * ranks, ranks, m)  # every rank gets all N log weights
            t_scan = allreduce_time(8.0, ranks, m)  # instead: an exclusive scan of per-rank weight sums
            t_bal = mv["max_recv_balanced"] * r.field_bytes / m.ib.bandwidth + m.ib.alpha
            # contiguous slots as an all-to-all exchange: one message to every other rank (R - 1 latencies)
            t_con = mv["max_recv_contiguous"] * r.field_bytes / m.ib.bandwidth + (ranks - 1) * m.ib.alpha
            t_grad = allreduce_time(4.0 * r.transport_params, ranks, m)
            comm_best = t_ess + t_scan + t_bal
            rows.append({
                "key": r.key, "n_per_rank": n, "ranks": ranks, "t_smc": t_smc, "t_craft": t_craft, "t_ess": t_ess,
                "t_gather": t_gather, "t_scan": t_scan, "t_move_balanced": t_bal, "t_move_contiguous": t_con,
                "t_grad": t_grad, "comm_best": comm_best, "comm_contiguous": t_ess + t_gather + t_con,
                "eff_smc_best": t_smc / (t_smc + comm_best),
                "eff_smc_contiguous": t_smc / (t_smc + t_ess + t_gather + t_con),
                "eff_craft_best": t_craft / (t_craft + comm_best + t_grad),
                "max_particles_per_gpu": int(m.memory // (r.act_bytes_per_particle + 4 * r.field_bytes)),
            })  # fmt: skip
    return rows


# --- output -------------------------------------------------------------------------------------------------------


def _ms(t: float) -> str:
    return f"{t * 1e3:.3g}"


def print_tables(out: dict[str, Any], m: Machine, p: Callable[[str], None]) -> None:
    p("\n## Training: model sizes and CPU anchors\n")
    p("| case | timed on | params | grad fp32 MB | field MB/config | ops/step | CPU s/sample | CPU t0 s "
      "| act GB/sample | max batch/GPU |")  # fmt: skip
    p("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["training"]:
        tr = TrainResult(**r)
        p(f"| {tr.label} | {tr.lattice} | {tr.n_params} | {4 * tr.n_params / 1e6:.3g} | {tr.field_bytes / 1e6:.3g} "
          f"| {tr.n_ops} | {tr.cpu_per_sample:.3g} | {tr.cpu_t0:.3g} | {tr.act_bytes_per_sample / 1e9:.3g} "
          f"| {max_batch(tr, m)} |")  # fmt: skip
    p(f"\n## Training: per step on the GPU model (speedup {m.speedup:g}, op time {m.op_time * 1e6:g} us)\n")
    p(
        "| case | R | batch/GPU | GPU ms/step (op floor) | grad MB fp32 | tree ms | ring ms | flat ring ms "
        "| host fp64 ms | eff tree | eff flat | eff host | B for 90%: tree / flat / host | params at tree = compute |"
    )
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in out["training_model"]:
        b90 = " / ".join("floor" if row[k] == 0 else f"{row[k]:.3g}" for k in ("b90_tree", "b90_flat", "b90_host"))
        p(f"| {row['key']} | {row['ranks']} | {row['batch']} | {_ms(row['t_comp'])} ({_ms(row['t_floor'])}) "
          f"| {row['grad_mb_fp32']:.3g} | {_ms(row['t_tree'])} | {_ms(row['t_ring'])} | {_ms(row['t_flat'])} "
          f"| {_ms(row['t_host'])} | {row['eff_tree']:.4f} | {row['eff_flat']:.3f} | {row['eff_host']:.3f} | {b90} "
          f"| {row['params_equal']:.2g} |")  # fmt: skip
    p("\n## Systematic resampling over ranks: particles that change rank\n")
    p("| R | N/R | ESS/N (target, realised) | moved, contiguous slots | moved, balanced | max recv/rank contiguous "
      "| max recv/rank balanced |")  # fmt: skip
    p("|---|---|---|---|---|---|---|")
    for row in out["resampling"]:
        p(f"| {row['ranks']} | {row['n_per_rank']} | {row['ess']}, {row['ess_realised']:.3f} "
          f"| {row['moved_contiguous']:.3f} | {row['moved_balanced']:.3f} | {row['max_recv_contiguous']:.1f} "
          f"| {row['max_recv_balanced']:.1f} |")  # fmt: skip
    if out["smc"]:
        p("\n## SMC / CRAFT transitions: CPU anchors\n")
        p("| case | MB/particle | transport params | CPU s/particle: CRAFT flow | frozen flow | kernel "
          "| ops/transition | max particles/GPU (CRAFT) | particles/GPU at the op floor: SMC / CRAFT |")  # fmt: skip
        p("|---|---|---|---|---|---|---|---|---|")
        for r in out["smc"]:
            sr = SMCResult(**r)
            cap = int(m.memory // (sr.act_bytes_per_particle + 4 * sr.field_bytes))
            floor = sr.n_ops * m.op_time * m.speedup
            n_smc, n_craft = floor / (sr.cpu_flow + sr.cpu_kernel), floor / (sr.cpu_flow_train + sr.cpu_kernel)
            p(f"| {sr.label} | {sr.field_bytes / 1e6:.3g} | {sr.transport_params} | {sr.cpu_flow_train:.3g} "
              f"| {sr.cpu_flow:.3g} | {sr.cpu_kernel:.3g} | {sr.n_ops} | {cap} "
              f"| {n_smc:.3g} / {n_craft:.3g} |")  # fmt: skip
        ess = out["smc_ess"]
        p(
            f"\n## One resampling transition at R = {out['smc_ranks']}, ESS/N = {ess} "
            "(ms; *: CRAFT exceeds the GPU memory)\n"
        )
        p(
            "| case | N/R | GPU SMC | GPU CRAFT | ESS/logZ allreduce | allgather N weights | scan | move balanced "
            "| move contiguous | CRAFT grad allreduce | eff SMC best | eff SMC contiguous+allgather | eff CRAFT best |"
        )
        p("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in out["smc_model"]:
            over = "*" if row["n_per_rank"] > row["max_particles_per_gpu"] else ""  # CRAFT does not fit
            p(f"| {row['key']} | {row['n_per_rank']} | {_ms(row['t_smc'])} | {_ms(row['t_craft'])}{over} "
              f"| {_ms(row['t_ess'])} | {_ms(row['t_gather'])} | {_ms(row['t_scan'])} | {_ms(row['t_move_balanced'])} "
              f"| {_ms(row['t_move_contiguous'])} | {_ms(row['t_grad'])} | {row['eff_smc_best']:.3f} "
              f"| {row['eff_smc_contiguous']:.3f} | {row['eff_craft_best']:.3f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny lattices, one case each: checks the script runs")
    ap.add_argument("--speedup", type=float, default=Machine.speedup, help="GPU / one CPU core throughput")
    ap.add_argument("--op-time", type=float, default=Machine.op_time, help="seconds per dispatched op on the GPU host")
    ap.add_argument("--nvlink-alpha", type=float, default=Machine.nvlink.alpha)
    ap.add_argument("--nvlink-bw", type=float, default=Machine.nvlink.bandwidth, help="bytes/s per GPU")
    ap.add_argument("--ib-alpha", type=float, default=Machine.ib.alpha)
    ap.add_argument("--ib-bw", type=float, default=Machine.ib.bandwidth, help="bytes/s per GPU (one NDR port)")
    ap.add_argument("--ess", type=float, default=0.3, help="ESS fraction at which SMC resamples (the CRAFT example's)")
    ap.add_argument("--no-smc", action="store_true", help="skip the SMC/CRAFT timings (resampling is still simulated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="also write everything as JSON")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="reuse the CPU measurements of an earlier --json run (no timing)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    m = replace(
        Machine(), speedup=args.speedup, op_time=args.op_time, nvlink=Link(args.nvlink_alpha, args.nvlink_bw),
        ib=Link(args.ib_alpha, args.ib_bw),
    )  # fmt: skip
    log = print
    log(f"# scaling model: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    log(f"machine model: {asdict(m)}")
    t_start = time.perf_counter()
    smc: list[SMCResult] = []
    if args.from_json is not None:
        earlier = json.loads(args.from_json.read_text(encoding="utf-8"))
        training = [TrainResult(**r) for r in earlier["training"]]
        smc = [SMCResult(**r) for r in earlier["smc"]]
        log(f"CPU measurements from {args.from_json}")
    else:
        log("training steps (CPU):")
        training = [measure_training(c, log) for c in train_cases(args.quick)]
        if not args.no_smc:
            log("SMC / CRAFT transitions (CPU):")
            smc = [measure_smc(c, log) for c in smc_cases(args.quick)]
    rng = np.random.default_rng(args.seed)
    n_list = (1, 16, 256) if args.quick else (1, 4, 16, 64, 256, 1024)
    ess_list = (args.ess,) if args.quick else (0.5, args.ess, 0.1)
    rank_list = (64,) if args.quick else RANKS
    resampling, moves = [], {}
    for ranks in rank_list:
        for ess in ess_list:
            for n in n_list:
                mv = simulate_resampling(n, ranks, ess, rng, repeats=2 if args.quick else 3)
                resampling.append({"ranks": ranks, "n_per_rank": n, "ess": ess, **mv})
                if ranks == rank_list[-1]:
                    moves[(n, ess)] = mv
    smc_ranks = rank_list[-1]
    out: dict[str, Any] = {
        "machine": asdict(m),
        "training": [asdict(r) for r in training],
        "training_model": training_table(training, m),
        "resampling": resampling,
        "smc": [asdict(r) for r in smc],
        "smc_ranks": smc_ranks,
        "smc_ess": args.ess,
        "smc_model": smc_table(smc, moves, m, n_list, smc_ranks, args.ess),
    }
    print_tables(out, m, print)
    log(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
