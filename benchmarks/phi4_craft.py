"""CRAFT on the phi^4 setting of its paper: training cost, and CRAFT / SMC / AFT / flow-MCMC at equal wall time.

Setting (Matthews, Arbel, Rezende, Doucet 2022; docs/REFERENCES.md): 14x14 lattice, m2 = -4.75, lam = 5.1,
N(0, 1) prior, geometric annealing with 10 linear transitions, resampling below ESS 0.3, Markov kernel of
10 HMC trajectories x 10 leapfrog steps per temperature (step 0.3 -> 0.15 -> 0.1 over t), one transport flow
per transition of 2 affine checkerboard couplings (3x3 conv, one hidden layer of 10 channels, identity
init), Adam lr 1e-3, float32.

Parts, all in one process on one torch thread:

1. seconds per CRAFT training iteration at each ``--timing-particles`` (after one warm-up iteration), split
   into HMC kernel, transport flows (forward + backward + Adam) and the rest (reweighting, resampling);
2. a long batched HMC reference (Omelyan, tuned) for ``chi2`` (V M^2) and ``ising_energy``, Gamma-method
   errors; it prints a ``--hmc-ref`` flag that skips this part on a rerun;
3. at equal wall time ``--budget`` per method: CRAFT (train for ``--train-fraction`` of the budget, then
   independent runs with frozen flows), SMC (same kernel and schedule, no flows), AFT (flows fitted per
   transition on a training population) and flow-MCMC (real-NVP trained by reverse KL, then independence
   Metropolis). Reported: log Z over runs (flow-MCMC: log mean exp(log p - log q) per proposal batch), ESS per
   particle, chi_2 and the Ising energy against the HMC reference (z-scores), and the cost per independent
   sample of chi_2:

   - annealing runs: ``n_eff per run = Var(chi2) / Var_r(O_r)`` (single-sample variance from the pooled
     weighted sample, ``Var_r`` across independent runs), cost = seconds per run / n_eff;
   - Markov chains: seconds per step x 2 tau_int (Gamma method).

Usage::

    python benchmarks/phi4_craft.py                       # about 12 minutes at the defaults
    python benchmarks/phi4_craft.py --quick               # under a minute; checks the script runs
    python benchmarks/phi4_craft.py --timing-particles 200 2000 --parts timing      # + the paper's 2000 (2 min)
    # skip the HMC reference with the numbers a previous run printed (BENCHMARKS.md: 39.056 0.179 0.24041 0.00042)
    python benchmarks/phi4_craft.py --parts compare --hmc-ref 39.05579 0.17878 0.24041 0.00042
    # closer to the paper: longer CRAFT training, 2000 particles (hours on 2 cores)
    python benchmarks/phi4_craft.py --parts compare --methods craft smc --budget 7200 --train-fraction 0.8 \
        --particles 2000 --populations 1 --hmc-ref 39.05579 0.17878 0.24041 0.00042
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latflow.analysis import ess, gamma_method, weighted_estimate
from latflow.flows import make_affine_flow
from latflow.lattice import Lattice
from latflow.priors import NormalPrior
from latflow.rng import make_generator
from latflow.samplers import HMC, FlowMCMC
from latflow.samplers.annealing import (
    SMC,
    AnnealResult,
    GeometricPath,
    HMCKernel,
    StepSize,
    fixed_schedule,
    log_mean_exp,
)
from latflow.samplers.annealing.aft import AFT
from latflow.samplers.annealing.craft import CRAFT
from latflow.samplers.annealing.transport import TransportFlow, affine_transport
from latflow.theories.phi4 import Phi4Params, Phi4Theory
from latflow.training import ReverseKLTrainer

OBSERVABLES = ("chi2", "ising_energy")


# --- the paper's setting --------------------------------------------------------------------------


@dataclass
class Setting:
    """The theory, annealing path, Markov kernel and schedule shared by SMC, AFT and CRAFT."""

    theory: Phi4Theory
    path: GeometricPath
    kernel: HMCKernel
    schedule: list[float]
    dtype: torch.dtype


def make_setting(args: argparse.Namespace) -> Setting:
    lat = Lattice((args.L, args.L))
    theory = Phi4Theory(Phi4Params(args.m2, args.lam), lat)
    dtype = torch.float32
    prior = NormalPrior(lat.shape, 1.0, dtype=dtype)
    path = GeometricPath(prior, lambda x: -theory.action(x), target_force=theory.force)
    kernel = HMCKernel(
        StepSize(args.step_sizes), args.n_leapfrog, args.n_hmc, integrator="leapfrog", step_jitter=args.step_jitter
    )
    return Setting(theory, path, kernel, fixed_schedule(args.n_transitions), dtype)


def make_flows(st: Setting, args: argparse.Namespace, seed: int) -> list[TransportFlow]:
    """``K`` identity-initialised transports: 2 affine checkerboard couplings, 3x3 conv, hidden (10,)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            affine_transport(st.theory.lattice, args.flow_layers, args.flow_hidden, 3, dtype=st.dtype)
            for _ in range(args.n_transitions)
        ]


# --- wall-clock split of one annealing pass -------------------------------------------------------


class KernelClock:
    """A Markov kernel that accumulates the seconds spent in its moves."""

    def __init__(self, kernel: HMCKernel) -> None:
        self.kernel = kernel
        self.seconds = 0.0

    def move(self, *a: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.kernel.move(*a, **kw)
        self.seconds += time.perf_counter() - t0
        return out

    def move_evaluated(self, *a: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel's ``move_evaluated`` (the moved particles with their ``log gamma``), timed."""
        t0 = time.perf_counter()
        out = self.kernel.move_evaluated(*a, **kw)
        self.seconds += time.perf_counter() - t0
        return out

    @property
    def proposals(self) -> int:
        return self.kernel.proposals


class TransportClock:
    """Wraps an :class:`SMC` so that the seconds spent in its transport maps are accumulated."""

    def __init__(self, smc: SMC) -> None:
        self.smc = smc
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.smc, name)

    def run(self, *a: Any, transport: Callable | None = None, **kw: Any) -> AnnealResult:
        if transport is None:
            return self.smc.run(*a, **kw)

        def timed(k: int, x: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t0 = time.perf_counter()
            out = transport(k, x, log_w)
            self.seconds += time.perf_counter() - t0
            return out

        return self.smc.run(*a, transport=timed, **kw)


def time_training(args: argparse.Namespace, n_particles: int) -> dict[str, float]:
    """Wall seconds per CRAFT training iteration (mean over ``--timing-iters`` after one warm-up), its split, and
    the process CPU seconds per iteration (the fairer figure when other work shares the cores)."""
    st = make_setting(args)
    clock = KernelClock(st.kernel)
    craft = CRAFT(st.path, clock, st.schedule, make_flows(st, args, args.seed), lr=args.lr)  # type: ignore[arg-type]
    tclock = TransportClock(craft.smc)
    craft.smc = tclock  # type: ignore[assignment]
    gen = make_generator(args.seed, 10, n_particles)
    craft.train_iteration(n_particles, gen)  # warm-up
    clock.seconds = tclock.seconds = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    log_z = []
    for _ in range(args.timing_iters):
        log_z.append(float(craft.train_iteration(n_particles, gen).log_z[0]))
    total = (time.perf_counter() - t0) / args.timing_iters
    cpu = (time.process_time() - c0) / args.timing_iters
    kern = clock.seconds / args.timing_iters
    flow = tclock.seconds / args.timing_iters
    return {"total": total, "cpu": cpu, "kernel": kern, "flows": flow, "rest": total - kern - flow, "log_z": log_z[-1]}


# --- HMC reference --------------------------------------------------------------------------------


@dataclass
class Reference:
    mean: dict[str, float]
    err: dict[str, float]
    tau: dict[str, float] = field(default_factory=dict)
    var_chi2: float = math.nan
    seconds_per_step: float = math.nan  # per trajectory per chain
    extra: str = ""


def hmc_reference(st: Setting, args: argparse.Namespace) -> Reference:
    """Batched Omelyan HMC (float64, analytic force), step tuned to 85% acceptance; Gamma method over chains."""
    th = st.theory
    gen = make_generator(args.seed, 2)
    x0 = 0.5 * torch.randn((args.hmc_chains, *th.lattice.shape), generator=gen, dtype=torch.float64)
    hmc = HMC(
        th.action,
        x0,
        step_size=0.1,
        n_steps=10,
        generator=gen,
        integrator="omelyan",
        force=th.force,
        step_jitter=0.2,
    )
    hmc.tune(args.hmc_tune, 0.85)
    hmc.run(args.hmc_therm)
    t0 = time.perf_counter()
    block = hmc.run(args.hmc_traj)
    dt = (time.perf_counter() - t0) / (args.hmc_traj * args.hmc_chains)
    obs = th.observables(block.x)
    ref = Reference({}, {}, seconds_per_step=dt)
    for k in OBSERVABLES:
        a = obs[k].numpy().reshape(-1, args.hmc_chains)
        r = gamma_method([a[:, c] for c in range(args.hmc_chains)])
        ref.mean[k], ref.err[k], ref.tau[k] = r.mean, r.err, r.tau_int
    ref.var_chi2 = float(obs["chi2"].var())
    acc = float(block.accepted.float().mean())
    ref.extra = (
        f"B={args.hmc_chains} x {args.hmc_traj} traj, eps={hmc.step_size:.3f} x {hmc.n_steps} Omelyan, acc {acc:.3f}"
    )
    return ref


# --- equal-budget comparison ----------------------------------------------------------------------


@dataclass
class Row:
    method: str
    n: int  # runs (annealing) or Markov steps (flow-MCMC)
    train_s: float
    seconds_per_unit: float  # per run, or per Markov step
    log_z: float  # combined estimate
    log_z_spread: float  # std over runs (flow-MCMC: over proposal batches)
    ess: float  # per particle (flow-MCMC: of the proposals)
    mean: dict[str, float]
    err: dict[str, float]
    n_eff: float  # independent chi2 samples per run (flow-MCMC: 1 / (2 tau_int))
    extra: str = ""

    @property
    def cost(self) -> float:
        """Seconds per independent sample of chi2."""
        return self.seconds_per_unit / self.n_eff if self.n_eff > 0 else math.inf


def summarise_runs(
    method: str, results: list[AnnealResult], seconds: float, train_s: float, theory: Phi4Theory, extra: str = ""
) -> Row:
    """Per-run log Z, ESS and weighted observables of batched annealing passes; runs combined by their Z."""
    log_z = torch.cat([r.log_z for r in results]).numpy()
    # ESS fraction of the last transition's weights, before its resampling decision (after it, uniform weights)
    ess_r = torch.cat([r.ess[-1] for r in results]).numpy()
    n_runs = len(log_z)
    obs_cols: dict[str, list[np.ndarray]] = {k: [] for k in OBSERVABLES}
    log_w_all, chain_all = [], []
    per_run: dict[str, list[np.ndarray]] = {k: [] for k in OBSERVABLES}
    first = 0
    for r in results:
        p, n = r.n_populations, r.n_particles
        obs = theory.observables(r.x.double())
        w = torch.softmax(r.log_w, dim=-1)  # [P, N]
        for k in OBSERVABLES:
            v = obs[k].view(p, n)
            obs_cols[k].append(v.reshape(-1).numpy())
            per_run[k].append((w * v).sum(-1).numpy())
        log_w_all.append(r.log_w.reshape(-1).numpy())
        chain_all.append(np.repeat(np.arange(first, first + p), n))
        first += p
    chain = np.concatenate(chain_all)
    log_w = np.concatenate(log_w_all)
    mean, err = {}, {}
    for k in OBSERVABLES:
        mean[k], err[k], _ = weighted_estimate(np.concatenate(obs_cols[k]), chain, log_w, log_z)
    # single-sample variance of chi2 from the pooled sample, each run's weights scaled by its Z
    chi2 = np.concatenate(obs_cols["chi2"])
    lw = log_w + log_z[chain] - np.logaddexp.reduce(log_w.reshape(n_runs, -1), axis=1)[chain]
    wp = np.exp(lw - lw.max())
    wp /= wp.sum()
    var = float(wp @ (chi2 - wp @ chi2) ** 2)
    o_r = np.concatenate(per_run["chi2"])
    var_r = float(np.var(o_r, ddof=1)) if n_runs > 1 else math.nan
    return Row(
        method,
        n_runs,
        train_s,
        seconds / n_runs,
        float(log_mean_exp(torch.from_numpy(log_z))),
        float(np.std(log_z, ddof=1)) if n_runs > 1 else math.nan,
        float(ess_r.mean()),
        mean,
        err,
        var / var_r if var_r > 0 else math.nan,
        extra,
    )


def repeat_runs(run: Callable[[torch.Generator], AnnealResult], seconds: float, gen: torch.Generator) -> tuple:
    """Batched passes until ``seconds`` are used (at least two); returns the results and the time taken."""
    results: list[AnnealResult] = []
    t0 = time.perf_counter()
    while len(results) < 2 or time.perf_counter() - t0 < seconds:
        results.append(run(gen))
    return results, time.perf_counter() - t0


def compare_smc(st: Setting, args: argparse.Namespace) -> Row:
    smc = SMC(st.path, st.kernel, st.schedule, resample_threshold=args.resample_threshold)
    gen = make_generator(args.seed, 20)
    res, dt = repeat_runs(lambda g: smc.run(args.particles, g, n_populations=args.populations), args.budget, gen)
    return summarise_runs("SMC", res, dt, 0.0, st.theory, f"{args.populations} runs per pass")


def compare_aft(st: Setting, args: argparse.Namespace) -> Row:
    def make_flow() -> TransportFlow:
        return make_flows(st, args, args.seed)[0]

    aft = AFT(
        st.path,
        st.kernel,
        st.schedule,
        make_flow,
        n_opt_steps=args.aft_steps,
        lr=args.aft_lr,
        resample_threshold=args.resample_threshold,
    )
    gen = make_generator(args.seed, 30)
    res, dt = repeat_runs(lambda g: aft.run(args.particles, g, n_populations=args.populations), args.budget, gen)
    extra = f"{args.aft_steps} Adam steps (lr {args.aft_lr}) per transition on 1 training population"
    return summarise_runs("AFT", res, dt, 0.0, st.theory, extra)


def compare_craft(st: Setting, args: argparse.Namespace) -> Row:
    craft = CRAFT(
        st.path,
        st.kernel,
        st.schedule,
        make_flows(st, args, args.seed),
        lr=args.lr,
        resample_threshold=args.resample_threshold,
    )
    gen = make_generator(args.seed, 40)
    t_train = args.train_fraction * args.budget
    t0 = time.perf_counter()
    log_z_train = []
    while time.perf_counter() - t0 < t_train:
        log_z_train.append(float(craft.train_iteration(args.particles, gen).log_z[0]))
    train_s = time.perf_counter() - t0
    res, dt = repeat_runs(
        lambda g: craft.run(args.particles, g, n_populations=args.populations), args.budget - train_s, gen
    )
    tail = np.array(log_z_train[-10:])
    extra = (
        f"{craft.iteration} training iterations; last 10 training log Z {tail.mean():.2f} +- {tail.std(ddof=1):.2f}"
        if len(tail) > 1
        else f"{craft.iteration} training iterations"
    )
    return summarise_runs("CRAFT", res, dt, train_s, st.theory, extra)


def compare_flow_mcmc(st: Setting, args: argparse.Namespace) -> Row:
    th = st.theory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = make_affine_flow(th.lattice, args.nf_layers, args.nf_hidden, dtype=st.dtype)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return -th.action(x)

    trainer = ReverseKLTrainer(
        model, log_p, batch_size=args.nf_batch, lr=args.nf_lr, generator=make_generator(args.seed, 50)
    )
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.train_fraction * args.budget:
        trainer.train_step()
    train_s = time.perf_counter() - t0
    sampler = FlowMCMC(model, log_p, batch_size=args.nf_sample_batch, generator=make_generator(args.seed, 51))
    blocks = []
    t0 = time.perf_counter()
    while len(blocks) < 2 or time.perf_counter() - t0 < args.budget - train_s:
        blocks.append(sampler.run(args.nf_sample_batch))
    dt = time.perf_counter() - t0
    n = len(blocks) * args.nf_sample_batch
    x = torch.cat([b.x for b in blocks])
    obs = th.observables(x.double())
    mean, err, tau = {}, {}, {}
    for k in OBSERVABLES:
        r = gamma_method(obs[k].numpy())
        mean[k], err[k], tau[k] = r.mean, r.err, r.tau_int
    lw = torch.stack([b.proposal_log_w.double() for b in blocks])  # [batches, batch]
    per_batch = log_mean_exp(lw, dim=-1).numpy()
    acc = float(torch.cat([b.accepted for b in blocks]).float().mean())
    extra = (
        f"{trainer.step} training steps (batch {args.nf_batch}); {n} steps, acceptance {acc:.3f}, "
        f"tau_int chi2 {tau['chi2']:.1f}"
    )
    return Row(
        "flow-MCMC",
        n,
        train_s,
        dt / n,
        float(log_mean_exp(lw.reshape(-1))),
        float(np.std(per_batch, ddof=1)),
        float(ess(lw.reshape(-1).numpy())),
        mean,
        err,
        1.0 / (2.0 * tau["chi2"]),
        extra,
    )


# --- output ---------------------------------------------------------------------------------------


def z_score(row_mean: float, row_err: float, ref: Reference, k: str) -> float:
    return (row_mean - ref.mean[k]) / math.hypot(row_err, ref.err[k])


def print_comparison(rows: list[Row], ref: Reference, args: argparse.Namespace) -> None:
    print(
        f"\n## equal wall time: {args.budget:.0f} s per method, {args.particles} particles, "
        f"train fraction {args.train_fraction} (CRAFT, flow-MCMC)"
    )
    print(
        "| method | runs / steps | train s | s per run (step) | log Z | spread | ESS/N | chi2 (z) | ising E (z) "
        f"| n_eff per run | s per indep. chi2 | total s for {args.n_target} chi2 incl. training | notes |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        obs = " | ".join(
            f"{r.mean[k]:.4f}({1e4 * r.err[k]:.0f}e-4) ({z_score(r.mean[k], r.err[k], ref, k):+.1f})"
            for k in OBSERVABLES
        )
        total = r.train_s + args.n_target * r.cost
        print(
            f"| {r.method} | {r.n} | {r.train_s:.0f} | {r.seconds_per_unit:.4g} | {r.log_z:.3f} | {r.log_z_spread:.3f} "
            f"| {r.ess:.3g} | {obs} | {r.n_eff:.3g} | {r.cost:.4g} | {total:.4g} | {r.extra} |"
        )
    hmc_cost = ref.seconds_per_step * 2 * ref.tau["chi2"]
    print(
        f"| HMC (reference) | {args.hmc_chains}x{args.hmc_traj} | 0 | {ref.seconds_per_step:.4g} | - | - | - | "
        + " | ".join(f"{ref.mean[k]:.4f}({1e4 * ref.err[k]:.0f}e-4)" for k in OBSERVABLES)
        + f" | {1 / (2 * ref.tau['chi2']):.3g} | {hmc_cost:.4g} | {args.n_target * hmc_cost:.4g} | {ref.extra} |"
    )
    for r in rows:
        print(f"cost ratio {r.method} / HMC per independent chi2: {r.cost / hmc_cost:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["timing", "reference", "compare"])
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    p.add_argument("--L", type=int, default=14)
    p.add_argument("--m2", type=float, default=-4.75)
    p.add_argument("--lam", type=float, default=5.1)
    p.add_argument("--n-transitions", type=int, default=10)
    p.add_argument("--n-hmc", type=int, default=10, help="HMC trajectories per temperature")
    p.add_argument("--n-leapfrog", type=int, default=10)
    p.add_argument("--step-sizes", type=float, nargs="+", default=[0.3, 0.15, 0.1])
    p.add_argument("--step-jitter", type=float, default=0.0)
    p.add_argument("--resample-threshold", type=float, default=0.3)
    p.add_argument("--flow-layers", type=int, default=2)
    p.add_argument("--flow-hidden", type=int, nargs="+", default=[10])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--timing-particles", type=int, nargs="+", default=[200])
    p.add_argument("--timing-iters", type=int, default=3)
    p.add_argument("--hmc-ref", type=float, nargs=4, metavar=("CHI2", "ERR", "E", "ERR"), default=None)
    p.add_argument("--hmc-chains", type=int, default=64)
    p.add_argument("--hmc-tune", type=int, default=200)
    p.add_argument("--hmc-therm", type=int, default=200)
    p.add_argument("--hmc-traj", type=int, default=3000)
    p.add_argument("--budget", type=float, default=150.0, help="wall seconds per method")
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--particles", type=int, default=200)
    p.add_argument("--populations", type=int, default=4, help="independent runs per batched pass")
    p.add_argument("--aft-steps", type=int, default=20)
    p.add_argument("--aft-lr", type=float, default=1e-2)
    p.add_argument("--nf-layers", type=int, default=8)
    p.add_argument("--nf-hidden", type=int, nargs="+", default=[16, 16])
    p.add_argument("--nf-lr", type=float, default=2e-3)
    p.add_argument("--nf-batch", type=int, default=64)
    p.add_argument("--nf-sample-batch", type=int, default=1000)
    p.add_argument("--n-target", type=int, default=10000, help="samples for the 'total including training' column")
    p.add_argument("--methods", nargs="+", default=["craft", "smc", "aft", "flow-mcmc"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2022)
    args = p.parse_args()
    if args.quick:
        args.L, args.n_hmc, args.timing_iters, args.budget = 6, 2, 1, 8.0
        args.hmc_chains, args.hmc_tune, args.hmc_therm, args.hmc_traj = 8, 20, 20, 100
        args.particles, args.nf_sample_batch = 32, 200
    torch.set_num_threads(args.threads)
    print("# command: python " + " ".join(sys.argv))
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, float32 (HMC reference float64); load average {os.getloadavg()}"
    )
    print(
        f"# L={args.L}, m2={args.m2}, lam={args.lam}; {args.n_transitions} transitions, {args.n_hmc} HMC x "
        f"{args.n_leapfrog} leapfrog, eps {args.step_sizes}, resample < {args.resample_threshold}; "
        f"transport {args.flow_layers} affine couplings hidden {args.flow_hidden}, lr {args.lr}"
    )
    st = make_setting(args)
    if "timing" in args.parts:
        print("\n## CRAFT training iteration")
        print("| particles | s / iteration | CPU s / iteration | HMC kernel s | flows (fwd+bwd+Adam) s | rest s |")
        print("|---|---|---|---|---|---|")
        for n in args.timing_particles:
            t = time_training(args, n)
            print(
                f"| {n} | {t['total']:.3f} | {t['cpu']:.3f} | {t['kernel']:.3f} | {t['flows']:.3f} | {t['rest']:.3f} |",
                flush=True,
            )
        print(f"# load average {os.getloadavg()}")
    if args.hmc_ref is not None:
        c, dc, e, de = args.hmc_ref
        ref = Reference({"chi2": c, "ising_energy": e}, {"chi2": dc, "ising_energy": de}, {"chi2": math.nan})
        ref.extra = "given by --hmc-ref"
    elif "reference" in args.parts or "compare" in args.parts:
        t0 = time.perf_counter()
        ref = hmc_reference(st, args)
        print(f"\n## HMC reference ({time.perf_counter() - t0:.0f} s): {ref.extra}")
        for k in OBSERVABLES:
            print(f"{k}: {ref.mean[k]:.5f} +- {ref.err[k]:.5f}, tau_int {ref.tau[k]:.2f}")
        print(f"Var(chi2) {ref.var_chi2:.4g}; {1e3 * ref.seconds_per_step:.4f} ms per trajectory per chain")
        r = ref
        print(
            f"# rerun without it: --hmc-ref {r.mean['chi2']:.5f} {r.err['chi2']:.5f} "
            f"{r.mean['ising_energy']:.5f} {r.err['ising_energy']:.5f}",
            flush=True,
        )
    if "compare" in args.parts:
        runners = {"craft": compare_craft, "smc": compare_smc, "aft": compare_aft, "flow-mcmc": compare_flow_mcmc}
        rows = []
        for m in args.methods:
            rows.append(runners[m](st, args))
            print(f"# {m} done; load average {os.getloadavg()}", flush=True)
        print_comparison(rows, ref, args)


if __name__ == "__main__":
    main()
