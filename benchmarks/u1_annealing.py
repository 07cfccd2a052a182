"""2D U(1), L = 16: annealing (SMC, CRAFT) against the fair HMC per independent topological charge, in one process.

For each beta in ``--betas`` (default 6 and 7), float64, one torch thread:

1. **HMC** (the baseline of ``benchmarks/u1_topology.py``, whose kernel and timing function are reused):
   Omelyan, 5 steps of 0.2 (trajectory length 1), 10% step jitter, analytic force. Seconds per trajectory per
   chain with ``--hmc-time-chains`` batched chains; ``tau_int(Q)`` from ``--hmc-chains`` chains of ``--hmc-traj``
   trajectories started from exact samples (no thermalisation), Gamma method with the known ``<Q> = 0``.
   Chains shorter than ~20 tau_int give a lower bound, so the ratios are also given with the long-run tau_int of
   BENCHMARKS.md (``TAU_TABLE``).
2. **SMC from Haar**: beta annealed along ``beta(t) = beta t``, ``t_k = (k / K)^2`` (so beta ~ s^2), one Omelyan
   trajectory (5 x 0.2) per temperature, systematic resampling when the ESS fraction falls below
   ``--resample-threshold``; ``K = --smc-transitions`` (200) and, as the flows' ablation, the CRAFT schedule
   ``K = --craft-transitions`` without flows.
3. **CRAFT from Haar** on the same path with ``K = --craft-transitions`` gauge-equivariant transport flows
   (``u1_equivariant_transport``: ``--craft-layers`` NCP plaquette couplings each), trained by CRAFT iterations
   for ``--craft-train-seconds``, then run with the frozen flows.
4. **From the plaquette prior** (:class:`latflow.plaquette_prior.U1PlaquettePrior` at the target beta: exact
   draws of independent von Mises plaquettes) along the geometric path to the target: importance sampling
   (one reweighting, no moves), plain SMC with ``--prior-transitions`` transitions, and CRAFT on them
   (``--prior-craft-train-seconds`` of training).

Figures of merit. Every annealing method makes ``--runs`` independent runs of ``--particles`` particles; run r
gives the weighted mean ``Q_r = sum_i W_i Q_i``. With the exact ``<Q> = 0`` and ``Var(Q) = <Q^2>`` (exact),
``n_eff(Q)`` per run ``= <Q^2> / mean_r Q_r^2`` (its relative error ~ sqrt(2 / R)); cost per independent Q
``=`` (seconds per run) / ``n_eff``. HMC: (seconds per trajectory per chain) x 2 tau_int(Q). Runs are made in
batches of ``max(1, --batch // N)`` populations, so every sampler works on ~``--batch`` configurations at a time.
``log Z`` per run (Haar probability measure) is compared with ``exact_log_z``. Training time is reported beside,
with a total including training for ``--total-q`` independent Q.

Usage::

    python benchmarks/u1_annealing.py                  # betas 6 and 7, L = 16 (~16 min on 2 cores at load 4)
    python benchmarks/u1_annealing.py --hmc-traj 12000 # the BENCHMARKS.md run (~20 min at load 4)
    python benchmarks/u1_annealing.py --quick          # half a minute; checks the script runs
    python benchmarks/u1_annealing.py --betas 7 --methods craft --hmc-traj 0 --craft-train-seconds 900
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from u1_topology import omelyan_hmc, time_hmc  # noqa: E402

from latflow.analysis import gamma_method  # noqa: E402
from latflow.gauge import u1_plaquette_angles  # noqa: E402
from latflow.lattice import Lattice  # noqa: E402
from latflow.manifolds import U1Angles  # noqa: E402
from latflow.plaquette_prior import U1PlaquettePrior  # noqa: E402
from latflow.rng import make_generator  # noqa: E402
from latflow.samplers.annealing import SMC, CouplingPath, GeometricPath, HMCKernel, StepSize, fixed_schedule  # noqa: E402
from latflow.samplers.annealing.core import AnnealResult  # noqa: E402
from latflow.samplers.annealing.craft import CRAFT  # noqa: E402
from latflow.samplers.annealing.transport import u1_equivariant_transport  # noqa: E402
from latflow.theories.u1 import (  # noqa: E402
    U1GaugeAction,
    U1Params,
    exact_log_z,
    exact_plaquette,
    exact_q2,
    sample_exact_2d,
)

# long-run HMC tau_int(Q) at L = 16 (BENCHMARKS.md, "topological freezing": 64 x 30 000 trajectories)
TAU_TABLE = {6.0: 1371.0, 7.0: 6598.0}


# --- paths ------------------------------------------------------------------------------------------


def haar_coupling_path(theory: U1GaugeAction) -> CouplingPath:
    """``log gamma_t = -t S_beta``: beta annealed from 0 (uniform links, exact) to the target, analytic force.

    ``log Z_0 = n_links log 2 pi`` (Lebesgue measure on the angles), as for the target's ``log Z`` estimate.
    """
    shape = theory.field_shape

    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand((n, *shape), generator=generator, dtype=torch.float64)
        return math.pi - 2 * math.pi * u  # (-pi, pi]

    def log_density(x: torch.Tensor, t: float) -> torch.Tensor:
        return -t * theory.action(x)

    def linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = -theory.action(x)
        return torch.zeros_like(b), b

    def force(x: torch.Tensor, t: float) -> torch.Tensor:
        return t * theory.force(x)

    return CouplingPath(draw, theory.field_log_volume(), log_density, linear, force)


class PlaquettePriorWithForce:
    """:class:`U1PlaquettePrior` with the analytic HMC force ``-d log r / d theta`` ``[B, 2, L0, L1]``.

    ``log r = beta sum_x cos p_x + log mean_k exp(-beta cos p_k) + const`` (symmetric closing site), so
    ``-d log r / d p_x = beta sin p_x (1 - w_x)`` with ``w = softmax(-beta cos p)``; it is mapped to the links like
    the Wilson force.
    """

    def __init__(self, prior: U1PlaquettePrior) -> None:
        if not prior.symmetric:
            raise ValueError("the force is written for the symmetric plaquette prior")
        self.prior = prior
        self.beta = float(prior.beta)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior.sample(n, generator)

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(theta)

    def force(self, theta: torch.Tensor) -> torch.Tensor:
        p = u1_plaquette_angles(theta)[:, 0]  # [B, L0, L1]
        w = torch.softmax(-self.beta * torch.cos(p).flatten(1), dim=1).view_as(p)
        g = self.beta * torch.sin(p) * (1 - w)
        out = torch.empty_like(theta)
        torch.sub(g, g.roll(1, 2), out=out[:, 0])
        torch.sub(g.roll(1, 1), g, out=out[:, 1])
        return out


def check_prior_force(prior: PlaquettePriorWithForce, generator: torch.Generator) -> float:
    """Largest deviation of the analytic prior force from autograd on a few random configurations."""
    x = (torch.rand((3, *prior.prior.shape), generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(-prior.log_prob(x).sum(), x)
    return float((grad - prior.force(x.detach())).abs().max())


def hmc_kernel(n_steps: int, step: float) -> HMCKernel:
    """One Omelyan trajectory of ``n_steps`` steps of ``step`` (10% jitter) per temperature."""
    return HMCKernel(StepSize(step), n_steps, 1, integrator="omelyan", manifold=U1Angles(), step_jitter=0.1)


# --- runs and their figures of merit ------------------------------------------------------------------


@dataclass
class Row:
    method: str
    seconds_per_run: float
    n_eff: float  # independent Q per run
    log_z_mean: float  # Haar probability measure, mean over runs
    log_z_std: float  # spread over runs
    log_z_exact: float
    train_seconds: float = 0.0
    ess: float = float("nan")  # mean final ESS fraction
    n_resample: float = float("nan")  # mean resamplings per run
    acceptance: float = float("nan")  # mean kernel acceptance
    plaquette: float = float("nan")  # pooled weighted mean
    q2: float = float("nan")  # pooled weighted <Q^2>
    runs: int = 0
    ms_per_indep: float = float("nan")

    def __post_init__(self) -> None:
        self.ms_per_indep = 1e3 * self.seconds_per_run / self.n_eff if self.n_eff > 0 else float("inf")


def weighted_runs(
    name: str,
    run: Callable[[int, torch.Generator], AnnealResult],
    theory: U1GaugeAction,
    args: argparse.Namespace,
    generator: torch.Generator,
    train_seconds: float = 0.0,
) -> Row:
    """``--runs`` independent runs of ``run(n_populations, generator)`` in batches; figures of merit of Q."""
    n = args.particles
    per_call = max(1, args.batch // n)
    q_r, lz, ess, nres, acc, plaq, q2 = [], [], [], [], [], [], []
    seconds = 0.0
    done = 0
    log_vol = theory.field_log_volume()
    run(1, make_generator(args.seed, 99))  # warm-up (allocations, first calls), not timed and not used
    while done < args.runs:
        p = min(per_call, args.runs - done)
        t0 = time.perf_counter()
        res = run(p, generator)
        seconds += time.perf_counter() - t0
        obs = theory.observables(res.x)
        q = obs["topological_charge"].round().view(p, n).double()
        w = torch.exp(res.log_w)  # [P, N], normalised per run
        q_r.append((w * q).sum(1))
        q2.append((w * q * q).sum(1))
        plaq.append((w * obs["plaquette"].view(p, n).double()).sum(1))
        lz.append(res.log_z - log_vol)
        ess.append(res.final_ess())
        nres.append(res.n_resampled().double())
        acc.extend(res.acceptance)
        done += p
    qr = torch.cat(q_r).numpy()
    lzs = torch.cat(lz).numpy()
    exact = exact_q2(theory.beta, theory.lattice.shape)
    n_eff = exact / float(np.mean(qr**2)) if np.any(qr != 0) else float("inf")
    return Row(
        name,
        seconds / args.runs,
        n_eff,
        float(lzs.mean()),
        float(lzs.std(ddof=1)) if len(lzs) > 1 else float("nan"),
        exact_log_z(theory.beta, theory.lattice.shape),
        train_seconds,
        float(torch.cat(ess).mean()),
        float(torch.cat(nres).mean()),
        float(np.nanmean(acc)) if not np.all(np.isnan(acc)) else float("nan"),
        float(torch.cat(plaq).mean()),
        float(torch.cat(q2).mean()),
        args.runs,
    )


def train_craft(craft: CRAFT, seconds: float, max_iter: int, n: int, generator: torch.Generator) -> tuple[float, list]:
    """CRAFT iterations until ``seconds`` or ``max_iter``; returns the wall time and per-iteration
    (log Z in the path's measure, resamplings)."""
    t0 = time.perf_counter()
    hist = []
    while time.perf_counter() - t0 < seconds and craft.iteration < max_iter:
        r = craft.train_iteration(n, generator)
        if not all(math.isfinite(v) for v in r.extra["loss"]):
            raise RuntimeError(f"CRAFT training diverged at iteration {craft.iteration}")
        hist.append((float(r.log_z[0]), float(r.n_resampled()[0])))
    return time.perf_counter() - t0, hist


def print_training(name: str, hist: list, secs: float, theory: U1GaugeAction) -> None:
    """First and last-fifth log Z (Haar measure, minus exact) and resamplings of the training iterations."""
    tail = hist[-max(1, len(hist) // 5) :]
    off = theory.field_log_volume() + exact_log_z(theory.beta, theory.lattice.shape)
    print(
        f"  {name} training: {len(hist)} iterations in {secs:.0f} s; log Z - exact: first {hist[0][0] - off:+.2f},"
        f" last fifth {np.mean([h[0] for h in tail]) - off:+.2f}; resamplings per pass: first {hist[0][1]:.0f}, last"
        f" fifth {np.mean([h[1] for h in tail]):.1f}",
        flush=True,
    )


def make_flows(lattice: Lattice, k: int, args: argparse.Namespace) -> list:
    torch.manual_seed(args.seed)
    return [
        u1_equivariant_transport(lattice, args.craft_layers, tuple(args.craft_hidden), inner="ncp", n_mix=args.n_mix)
        for _ in range(k)
    ]


# --- HMC -----------------------------------------------------------------------------------------------


@dataclass
class HMCRow:
    ms_per_traj: float
    acceptance: float
    tau: float
    tau_err: float
    chains: int
    traj: int
    q2: float
    q2_err: float


def hmc_part(theory: U1GaugeAction, args: argparse.Namespace) -> HMCRow:
    gen = make_generator(args.seed, 1, int(10 * theory.beta))
    x0 = sample_exact_2d(theory.beta, theory.lattice.shape, args.hmc_chains, gen)
    dt, acc = time_hmc(theory, x0, args.n_steps, torch.float64, args)
    if args.hmc_traj <= 0:
        return HMCRow(1e3 * dt, acc, float("nan"), float("nan"), 0, 0, float("nan"), float("nan"))
    hmc = omelyan_hmc(theory, x0, 1.0 / args.n_steps, args.n_steps, gen)
    qs, remaining = [], args.hmc_traj
    while remaining > 0:
        m = min(remaining, 2000)
        block = hmc.run(m)
        qs.append(theory.observables(block.x)["topological_charge"].round().numpy().reshape(m, -1))
        remaining -= m
    q = np.concatenate(qs)
    rq = gamma_method([q[:, c] for c in range(q.shape[1])], known_mean=0.0)
    rq2 = gamma_method([q[:, c] ** 2 for c in range(q.shape[1])])
    return HMCRow(1e3 * dt, acc, rq.tau_int, rq.tau_int_err, q.shape[1], q.shape[0], rq2.mean, rq2.err)


# --- one beta ----------------------------------------------------------------------------------------


def run_beta(beta: float, args: argparse.Namespace) -> None:
    lat = Lattice((args.L, args.L))
    theory = U1GaugeAction(U1Params(beta), lat)
    eq2, ep = exact_q2(beta, lat.shape), exact_plaquette(beta, lat.shape)
    print(
        f"\n## beta = {beta:g}, L = {args.L}: exact log Z {exact_log_z(beta, lat.shape):.4f} (Haar), "
        f"<Q^2> {eq2:.4f}, plaquette {ep:.6f}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    t_all = time.perf_counter()
    hmc = hmc_part(theory, args)
    print(
        f"HMC: {hmc.ms_per_traj:.4f} ms/traj/chain (B = {args.hmc_time_chains}, float64, {args.n_steps} x "
        f"{1 / args.n_steps:.2f}), acc {hmc.acceptance:.3f}; tau_int(Q) {hmc.tau:.0f}({hmc.tau_err:.0f}) from "
        f"{hmc.chains} x {hmc.traj} traj from exact starts (<Q^2> {hmc.q2:.3f}({hmc.q2_err:.3f})); "
        f"table tau_int {TAU_TABLE.get(beta, float('nan')):.0f}; {time.perf_counter() - t_all:.0f} s; "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: list[Row] = []
    kernel = hmc_kernel(args.n_steps, 1.0 / args.n_steps)
    haar = haar_coupling_path(theory)

    def smc_runner(smc: SMC) -> Callable[[int, torch.Generator], AnnealResult]:
        return lambda p, g: smc.run(args.particles, g, n_populations=p)

    def report(row: Row) -> None:
        rows.append(row)
        print(
            f"  {row.method}: {row.seconds_per_run:.3f} s/run, n_eff(Q) {row.n_eff:.1f}/run, "
            f"{row.ms_per_indep:.2f} ms/indep Q, log Z {row.log_z_mean:.3f} +- {row.log_z_std:.3f} "
            f"(exact {row.log_z_exact:.3f}), ESS {row.ess:.3f}, resamplings {row.n_resample:.1f}, "
            f"acc {row.acceptance:.3f}, plaq {row.plaquette:.5f}, <Q^2> {row.q2:.3f}, train {row.train_seconds:.0f} s;"
            f" load {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    power = args.schedule_power
    for k in (args.smc_transitions, args.craft_transitions) if "smc" in args.methods else ():
        smc = SMC(haar, kernel, fixed_schedule(k, power), resample_threshold=args.resample_threshold)
        report(weighted_runs(f"SMC Haar K={k}", smc_runner(smc), theory, args, make_generator(args.seed, 2, k)))

    if "craft" in args.methods:  # CRAFT from Haar
        k = args.craft_transitions
        craft = CRAFT(
            haar, kernel, fixed_schedule(k, power), make_flows(lat, k, args),
            resample_threshold=args.resample_threshold, lr=args.lr, grad_clip=args.grad_clip,
        )  # fmt: skip
        secs, hist = train_craft(
            craft,
            args.craft_train_seconds,
            args.craft_max_iterations,
            args.train_particles,
            make_generator(args.seed, 3),
        )
        print_training(f"CRAFT Haar K={k}x{args.craft_layers}", hist, secs, theory)
        report(
            weighted_runs(
                f"CRAFT Haar K={k}x{args.craft_layers}",
                lambda p, g: craft.run(args.particles, g, n_populations=p),
                theory,
                args,
                make_generator(args.seed, 4),
                secs,
            )  # fmt: skip
        )

    if "prior" in args.methods:  # from the plaquette prior
        prior = PlaquettePriorWithForce(U1PlaquettePrior(lat, beta, dtype=torch.float64))
        err = check_prior_force(prior, make_generator(args.seed, 9))
        if err > 1e-9:
            raise RuntimeError(f"plaquette prior force differs from autograd by {err:.2e}")
        geo = GeometricPath(prior, lambda x: -theory.action(x), theory.force)
        imp = SMC(geo, None, [0.0, 1.0], resample_threshold=0.0)
        report(weighted_runs("IS plaquette prior", smc_runner(imp), theory, args, make_generator(args.seed, 5)))
        kp = args.prior_transitions
        smc = SMC(geo, kernel, fixed_schedule(kp), resample_threshold=args.resample_threshold)
        report(weighted_runs(f"SMC prior K={kp}", smc_runner(smc), theory, args, make_generator(args.seed, 6)))
        craft_p = CRAFT(
            geo, kernel, fixed_schedule(kp), make_flows(lat, kp, args),
            resample_threshold=args.resample_threshold, lr=args.lr, grad_clip=args.grad_clip,
        )  # fmt: skip
        secs, hist = train_craft(
            craft_p, args.prior_craft_train_seconds, args.craft_max_iterations, args.train_particles,
            make_generator(args.seed, 7),
        )  # fmt: skip
        print_training(f"CRAFT prior K={kp}x{args.craft_layers}", hist, secs, theory)
        report(
            weighted_runs(
                f"CRAFT prior K={kp}x{args.craft_layers}",
                lambda p, g: craft_p.run(args.particles, g, n_populations=p),
                theory,
                args,
                make_generator(args.seed, 8),
                secs,
            )  # fmt: skip
        )

    # the table
    taus = [("this run", hmc.tau), ("table", TAU_TABLE.get(beta, float("nan")))]
    hmc_cost = {name: hmc.ms_per_traj * 2 * tau for name, tau in taus}
    print(
        f"\n| method | s/run | n_eff(Q)/run | ms/indep Q | HMC/method (tau this run; table) | log Z - exact (spread) |"
        f" ESS | resamplings | training s | total for {args.total_q:.0e} Q (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, tau in taus:
        cost = hmc_cost[name]
        print(
            f"| HMC (tau_int {tau:.0f}, {name}) | {hmc.ms_per_traj:.4f} ms/traj | - | {cost:.1f} | 1 | - | - | - | 0 |"
            f" {cost * args.total_q / 1e3:.0f} |"
        )
    for r in rows:
        ratios = "; ".join(f"{hmc_cost[name] / r.ms_per_indep:.3g}" for name, _ in taus)
        total = r.train_seconds + r.ms_per_indep * args.total_q / 1e3
        print(
            f"| {r.method} | {r.seconds_per_run:.3f} | {r.n_eff:.1f} | {r.ms_per_indep:.2f} | {ratios} |"
            f" {r.log_z_mean - r.log_z_exact:+.3f} ({r.log_z_std:.3f}) | {r.ess:.3f} | {r.n_resample:.1f} |"
            f" {r.train_seconds:.0f} | {total:.0f} |"
        )
    print(
        f"n_eff from R = {args.runs} runs: relative error ~{math.sqrt(2 / args.runs):.0%}; beta {beta:g} took "
        f"{time.perf_counter() - t_all:.0f} s; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[6.0, 7.0])
    p.add_argument("--L", type=int, default=16)
    p.add_argument(
        "--methods", nargs="+", default=["smc", "craft", "prior"], choices=["smc", "craft", "prior"],
        help="smc: SMC from Haar; craft: CRAFT from Haar; prior: IS, SMC and CRAFT from the plaquette prior",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    p.add_argument("--runs", type=int, default=16, help="independent runs R per annealing method")
    p.add_argument("--particles", type=int, default=128, help="particles N per run")
    p.add_argument("--batch", type=int, default=256, help="configurations per batched call (runs per call: batch/N)")
    p.add_argument("--n-steps", type=int, default=5, help="Omelyan steps per unit trajectory (HMC and kernels)")
    p.add_argument("--resample-threshold", type=float, default=0.5)
    p.add_argument("--schedule-power", type=float, default=2.0, help="t_k = (k/K)^power on the Haar path")
    p.add_argument("--smc-transitions", type=int, default=200)
    p.add_argument("--craft-transitions", type=int, default=20)
    p.add_argument("--craft-layers", type=int, default=2, help="NCP couplings per transport flow")
    p.add_argument("--craft-hidden", type=int, nargs="+", default=[8, 8])
    p.add_argument("--n-mix", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-clip", type=float, default=10.0)
    p.add_argument("--train-particles", type=int, default=128)
    p.add_argument("--craft-train-seconds", type=float, default=150.0)
    p.add_argument("--craft-max-iterations", type=int, default=100000)
    p.add_argument("--prior-transitions", type=int, default=4)
    p.add_argument("--prior-craft-train-seconds", type=float, default=60.0)
    p.add_argument("--hmc-chains", type=int, default=64, help="chains of the tau_int(Q) runs (exact starts)")
    p.add_argument("--hmc-traj", type=int, default=6000, help="trajectories per chain (0: timing only)")
    p.add_argument("--hmc-time-chains", type=int, default=256)
    p.add_argument("--hmc-time-traj", type=int, default=100)
    p.add_argument("--total-q", type=float, default=1e4, help="independent Q of the 'total including training'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=17)
    args = p.parse_args()
    if args.quick:
        args.betas, args.L, args.runs, args.particles = args.betas[:1], 8, 4, 32
        args.smc_transitions, args.craft_transitions, args.prior_transitions = 20, 4, 2
        args.craft_train_seconds = args.prior_craft_train_seconds = 3.0
        args.hmc_chains, args.hmc_traj, args.hmc_time_chains, args.hmc_time_traj = 8, 200, 32, 10
    torch.set_num_threads(args.threads)
    print(f"# {' '.join(['python', *sys.argv])}")
    print(
        f"# {datetime.date.today()}, {platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, float64; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"# R = {args.runs} runs x N = {args.particles} particles; kernels: 1 Omelyan trajectory {args.n_steps} x "
        f"{1 / args.n_steps:.2f}; resampling below ESS {args.resample_threshold}; CRAFT: {args.craft_layers} NCP "
        f"layers/flow, hidden {args.craft_hidden}, lr {args.lr}, {args.train_particles} training particles"
    )
    for beta in args.betas:
        run_beta(beta, args)


if __name__ == "__main__":
    main()
