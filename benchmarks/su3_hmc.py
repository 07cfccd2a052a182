"""HMC on the SU(3) group manifold in 4D: time per trajectory per chain, acceptance and tau_int of the plaquette;
and the U(1) HMC timing with and without the field-manifold path (the runner's), to show it kept its speed.

SU(3) (``--su3``, default on): the Wilson action at ``--beta`` (6) on ``L^4`` for each ``--L`` (4 and 8), HMC as
``latflow run`` does it (:class:`latflow.samplers.HMC` with the theory's ``manifold = SUN(3)``: su(3) momenta,
``U -> exp(eps P) U``, the theory's analytic force ``F = (1/2) ta(G U^dagger)`` (the compiled fused kernel on the
CPU, :meth:`SUNGaugeAction.force`; the BENCHMARKS.md numbers before 2026-12-02 used the autograd force),
projection onto SU(3) after each trajectory),
Omelyan integrator, trajectory length 1, ``--chains`` chains batched: ``--therm`` trajectories from a cold start
at half the step ``1 / --n-steps``, then ``--tune`` trajectories tune the step to ``--target`` acceptance;
then ``--traj`` timed trajectories give the time per trajectory per chain (float64; then float32, i.e. complex64
links, on a copy of the thermalised chains), the acceptance and the plaquette's ``tau_int`` (Gamma method, the
chains as replicas).

U(1) (``--u1``): 2D U(1) at beta = 6, L = 16, the kernel of ``benchmarks/u1_topology.py`` (Omelyan, analytic
force, wrapped angles, 256 chains), timed with the plain Euclidean HMC (``manifold=None``, as that benchmark
runs it) and with ``manifold=U1Angles()`` (what the runner passes now), interleaved ``--repeats`` times.

Usage::

    python benchmarks/su3_hmc.py                         # 4^4 and 8^4 SU(3) and the U(1) check (~1 h, 1 core)
    python benchmarks/su3_hmc.py --L 4 --traj 200        # 4^4 only, longer chains for tau_int
    python benchmarks/su3_hmc.py --no-su3 --u1           # the U(1) timing only (~1 min)
    python benchmarks/su3_hmc.py --quick                 # checks the script runs (seconds)

At 8^4 the cold start relaxes over tens of trajectories: give ``--therm`` 50 or more before trusting the tuned step.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from latflow.analysis.gamma import gamma_method
from latflow.gauge import wrap_angle
from latflow.lattice import Lattice
from latflow.manifolds import U1Angles
from latflow.samplers import HMC
from latflow.theories.su3 import SUNGaugeAction, SUNParams
from latflow.theories.u1 import U1GaugeAction, U1Params


def su3_point(L: int, chains: int, args: argparse.Namespace) -> dict:
    """One SU(3) lattice ``L^4``: tune, thermalise, time; returns the row of the table."""
    theory = SUNGaugeAction(SUNParams(args.beta, 3), Lattice((L,) * 4))
    gen = torch.Generator().manual_seed(args.seed + L)
    hmc = HMC(
        theory.action,
        theory.initial_field(chains, gen, "cold"),
        step_size=1.0 / args.n_steps,
        n_steps=args.n_steps,
        generator=gen,
        integrator="omelyan",
        step_jitter=0.1,
        manifold=theory.manifold,
        force=theory.force,
    )
    t0 = time.perf_counter()
    # relax the cold start with half the step (a large volume rejects everything at the target step before),
    # then tune: tuning through the relaxation would shrink the step for good
    hmc.set_step_size(0.5 / args.n_steps)
    hmc.run(args.therm)
    hmc.set_step_size(1.0 / args.n_steps)
    hmc.tune(args.tune, args.target)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    block = hmc.run(args.traj)
    dt64 = (time.perf_counter() - t0) / (args.traj * chains)
    plaq = theory.observables(block.x)["plaquette"].numpy().reshape(args.traj, chains)
    res = gamma_method([plaq[:, c] for c in range(chains)])
    # float32: complex64 copies of the thermalised chains, same step
    gen32 = torch.Generator().manual_seed(args.seed + 100 + L)
    hmc32 = HMC(
        theory.action,
        hmc.x.to(torch.complex64),
        step_size=hmc.step_size,
        n_steps=hmc.n_steps,
        generator=gen32,
        integrator="omelyan",
        step_jitter=0.1,
        manifold=theory.manifold,
        force=theory.force,
    )
    n32 = max(2, args.traj // 4)
    hmc32.run(1)
    t0 = time.perf_counter()
    acc32 = hmc32.run(n32).accepted.double().mean().item()
    dt32 = (time.perf_counter() - t0) / (n32 * chains)
    return {
        "L": L,
        "beta": args.beta,
        "chains": chains,
        "eps": hmc.step_size,
        "n_steps": hmc.n_steps,
        "ms_per_traj_per_chain_f64": 1e3 * dt64,
        "ms_per_traj_per_chain_f32": 1e3 * dt32,
        "acceptance": block.accepted.double().mean().item(),
        "acceptance_f32": acc32,
        "plaquette": res.mean,
        "plaquette_err": res.err,
        "tau_int_plaquette": res.tau_int,
        "tau_int_err": res.tau_int_err,
        "trajectories": args.traj,
        "warmup_s": warm_s,
    }


def u1_timing(args: argparse.Namespace) -> dict:
    """ms per trajectory per chain of 2D U(1) HMC, plain (Euclidean) against ``manifold=U1Angles()``."""
    theory = U1GaugeAction(U1Params(6.0), Lattice((16, 16)))
    gen = torch.Generator().manual_seed(args.seed)
    x0 = math.pi * (1 - 2 * torch.rand((args.u1_chains, 2, 16, 16), generator=gen, dtype=torch.float64))
    warm = HMC(theory.action, x0, step_size=0.25, n_steps=4, generator=gen, integrator="omelyan", force=theory.force)
    warm.run(args.u1_therm)
    out: dict = {}
    for dtype, label in ((torch.float64, "f64"), (torch.float32, "f32")):
        times: dict[str, list[float]] = {"plain": [], "manifold": []}
        for _ in range(args.repeats):
            for kind in ("plain", "manifold"):
                hmc = HMC(
                    theory.action,
                    warm.x.to(dtype),
                    step_size=0.25,
                    n_steps=4,
                    generator=torch.Generator().manual_seed(args.seed + 1),
                    integrator="omelyan",
                    force=theory.force,
                    project=wrap_angle,
                    step_jitter=0.1,
                    manifold=U1Angles() if kind == "manifold" else None,
                )
                hmc.run(2)
                t0 = time.perf_counter()
                hmc.run(args.u1_traj)
                times[kind].append(1e3 * (time.perf_counter() - t0) / (args.u1_traj * args.u1_chains))
        for kind, ts in times.items():
            out[f"{kind}_{label}_min"] = min(ts)
            out[f"{kind}_{label}_median"] = statistics.median(ts)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beta", type=float, default=6.0)
    p.add_argument("--L", type=int, nargs="+", default=[4, 8])
    p.add_argument("--chains", type=int, nargs="+", default=[8, 2], help="chains per --L entry (last one repeats)")
    p.add_argument("--n-steps", type=int, default=8, help="Omelyan steps per unit trajectory before tuning")
    p.add_argument("--target", type=float, default=0.85, help="acceptance the step is tuned to")
    p.add_argument("--tune", type=int, default=30)
    p.add_argument("--therm", type=int, default=30)
    p.add_argument("--traj", type=int, default=40, help="timed float64 trajectories (a quarter of them in float32)")
    p.add_argument("--su3", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--u1", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--u1-chains", type=int, default=256)
    p.add_argument("--u1-traj", type=int, default=50)
    p.add_argument("--u1-therm", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    p.add_argument("--json", type=str, default="", help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.L, args.chains, args.tune, args.therm, args.traj = [2], [2], 3, 2, 4
        args.u1_chains, args.u1_traj, args.u1_therm, args.repeats = 16, 3, 3, 1
    torch.set_num_threads(args.threads)
    results: dict = {"su3": [], "u1": None}
    if args.su3:
        print(
            f"{'L':>3} {'beta':>5} {'B':>4} {'eps x n':>11} {'ms/traj/chain f64':>18} {'f32':>9} {'acc':>6} "
            f"{'plaquette':>14} {'tau_int(P)':>12} {'warm-up s':>10}",
            flush=True,
        )
        for i, L in enumerate(args.L):
            r = su3_point(L, args.chains[min(i, len(args.chains) - 1)], args)
            results["su3"].append(r)
            print(
                f"{L:>3} {r['beta']:>5g} {r['chains']:>4} {r['eps']:>6.4f} x {r['n_steps']:<2} "
                f"{r['ms_per_traj_per_chain_f64']:>18.1f} {r['ms_per_traj_per_chain_f32']:>9.1f} "
                f"{r['acceptance']:>6.3f} {r['plaquette']:>8.5f}({1e5 * r['plaquette_err']:3.0f}) "
                f"{r['tau_int_plaquette']:>6.2f}({r['tau_int_err']:.2f}) {r['warmup_s']:>10.0f}",
                flush=True,
            )
    if args.u1:
        u = u1_timing(args)
        results["u1"] = u
        print("2D U(1), L = 16, beta = 6, ms per trajectory per chain (min / median of the repeats):")
        for label in ("f64", "f32"):
            print(
                f"  {label}: plain HMC {u[f'plain_{label}_min']:.4f} / {u[f'plain_{label}_median']:.4f}   "
                f"manifold=U1Angles {u[f'manifold_{label}_min']:.4f} / {u[f'manifold_{label}_median']:.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
