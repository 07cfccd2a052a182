"""phi^4 near criticality: flow-MCMC vs HMC cost per independent sample, in one process.

For each lattice the flow is trained (time recorded), then flow-MCMC and a
tuned, batched HMC sample the same theory; tau_int of |M| and chi_2 comes from
the Gamma method (chains as replicas) and

    cost per independent sample = (wall seconds per Markov step per chain) x 2 tau_int.

Usage::

    python benchmarks/phi4_flow_vs_hmc.py                 # L = 8 and 14, the BENCHMARKS.md numbers
    python benchmarks/phi4_flow_vs_hmc.py --quick         # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from latflow.analysis import ess, gamma_method
from latflow.flows import make_affine_flow
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import HMC, FlowMCMC
from latflow.theories.phi4 import Phi4Params, Phi4Theory
from latflow.training import ReverseKLTrainer

# (L, m2, lam): Albergo, Kanwar, Shanahan 2019 Table I points with m_p L ~ 4
POINTS = {8: (-4.0, 6.008), 14: (-4.0, 5.113), 6: (-4.0, 6.975)}
OBSERVABLES = ("abs_magnetization", "chi2")


@dataclass
class Result:
    sampler: str
    seconds_per_step: float  # per Markov step per chain
    acceptance: float
    tau: dict[str, float]
    extra: str = ""

    def cost(self, name: str) -> float:
        return self.seconds_per_step * 2 * self.tau[name]


def series(theory: Phi4Theory, x: torch.Tensor, n_chains: int) -> dict[str, list[np.ndarray]]:
    obs = theory.observables(x)
    out = {}
    for name in OBSERVABLES:
        a = obs[name].detach().cpu().numpy().reshape(-1, n_chains)
        out[name] = [a[:, c] for c in range(n_chains)]
    return out


def run_flow(theory: Phi4Theory, args: argparse.Namespace, seed: int) -> tuple[Result, float, int]:
    lat = theory.lattice
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_affine_flow(lat, args.layers, args.hidden, dtype=torch.float64)
    trainer = ReverseKLTrainer(
        model, lambda x: -theory.action(x), batch_size=args.train_batch, lr=args.lr, generator=make_generator(seed, 0)
    )
    t0 = time.perf_counter()
    while trainer.step < args.train_steps and time.perf_counter() - t0 < args.train_seconds:
        trainer.train_step()
    t_train = time.perf_counter() - t0
    sampler = FlowMCMC(
        model, lambda x: -theory.action(x), batch_size=args.flow_batch, generator=make_generator(seed, 1)
    )
    sampler.run(args.flow_batch)  # warm-up (first proposal is accepted)
    t0 = time.perf_counter()
    block = sampler.run(args.flow_samples)
    dt = (time.perf_counter() - t0) / args.flow_samples
    s = series(theory, block.x, 1)
    tau = {k: gamma_method(v).tau_int for k, v in s.items()}
    # ESS of the proposals (independent draws from q), not of the chain's rows (distributed as p)
    w_ess = ess(block.proposal_log_w.cpu().numpy())
    res = Result("flow-MCMC", dt, float(block.accepted.float().mean()), tau, f"ESS {w_ess:.3f}")
    return res, t_train, trainer.step


def run_hmc(theory: Phi4Theory, args: argparse.Namespace, seed: int) -> Result:
    gen = make_generator(seed, 2)
    x0 = 0.1 * torch.randn((args.hmc_chains, *theory.lattice.shape), generator=gen, dtype=torch.float64)
    hmc = HMC(theory.action, x0, step_size=0.1, n_steps=10, generator=gen, integrator="omelyan", step_jitter=0.2)
    hmc.tune(args.hmc_tune, 0.85)
    hmc.run(args.hmc_therm)
    t0 = time.perf_counter()
    block = hmc.run(args.hmc_traj)
    dt = (time.perf_counter() - t0) / (args.hmc_traj * args.hmc_chains)
    s = series(theory, block.x, args.hmc_chains)
    tau = {k: gamma_method(v).tau_int for k, v in s.items()}
    extra = f"B={args.hmc_chains}, eps={hmc.step_size:.3f} x {hmc.n_steps}"
    return Result("HMC", dt, float(block.accepted.float().mean()), tau, extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 14])
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[16, 16])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-steps", type=int, default=4000)
    p.add_argument("--train-seconds", type=float, default=240.0)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--flow-samples", type=int, default=50000)
    p.add_argument("--flow-batch", type=int, default=1000)
    p.add_argument("--hmc-chains", type=int, default=64)
    p.add_argument("--hmc-tune", type=int, default=200)
    p.add_argument("--hmc-therm", type=int, default=200)
    p.add_argument("--hmc-traj", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    if args.quick:
        args.sizes = [6]
        args.train_steps, args.flow_samples, args.flow_batch = 30, 2000, 500
        args.hmc_chains, args.hmc_tune, args.hmc_therm, args.hmc_traj = 8, 20, 20, 100
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, float64"
    )
    for L in args.sizes:
        m2, lam = POINTS[L]
        theory = Phi4Theory(Phi4Params(m2, lam), Lattice((L, L)))
        flow, t_train, steps = run_flow(theory, args, args.seed)
        hmc = run_hmc(theory, args, args.seed)
        print(
            f"\n## L={L}, m2={m2}, lam={lam}; flow: {args.layers} affine layers, hidden {args.hidden}, "
            f"trained {steps} steps in {t_train:.1f} s"
        )
        print(
            f"{'sampler':<10} {'ms/step/chain':>14} {'acc':>6} "
            + " ".join(f"{'tau_int ' + k:>24} {'ms/indep ' + k:>24}" for k in OBSERVABLES)
            + "  notes"
        )
        for r in (flow, hmc):
            cols = " ".join(f"{r.tau[k]:>24.2f} {1e3 * r.cost(k):>24.4f}" for k in OBSERVABLES)
            print(f"{r.sampler:<10} {1e3 * r.seconds_per_step:>14.4f} {r.acceptance:>6.3f} {cols}  {r.extra}")
        for k in OBSERVABLES:
            ratio = hmc.cost(k) / flow.cost(k)
            breakeven = t_train / max(hmc.cost(k) - flow.cost(k), 1e-30) if ratio > 1 else float("inf")
            print(
                f"cost ratio HMC/flow for {k}: {ratio:.2f}; training pays off after {breakeven:.3g} independent samples"
            )


if __name__ == "__main__":
    main()
