"""Plain SMC from Haar links for 2D U(1): how the schedule and the kernel effort set the independent charges per run.

Each configuration ``K,TRAJ,THRESHOLD,POWER`` anneals ``beta(t) = beta t`` on ``t_k = (k/K)^POWER`` with ``TRAJ``
Omelyan trajectories (5 x 0.2, 10% jitter, analytic force) per temperature and systematic resampling below the
ESS fraction ``THRESHOLD``; ``P`` independent runs of ``N`` particles are batched. Printed per configuration:
seconds per run, n_eff(Q) per run = <Q^2>_exact / mean_r Q_r^2 (Q_r the run's weighted mean charge; exact mean 0),
milliseconds per independent Q, resamplings per run and the load average. n_eff is good to ~35% with 16 runs.

    python benchmarks/u1_smc_schedules.py --beta 7 200,1,0.5,2 100,2,0.5,2 50,4,0.5,2 200,1,0.3,2 \\
        400,1,0.5,2 200,1,0.5,3 200,1,0.5,1 800,1,0.5,2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from latflow.lattice import Lattice
from latflow.manifolds import U1Angles
from latflow.samplers.annealing import SMC, CouplingPath, HMCKernel, fixed_schedule
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_q2, topological_charge


def haar_path(theory: U1GaugeAction, shape: tuple[int, int]) -> CouplingPath:
    """``log gamma_t = -t S_beta`` from uniform links (``log Z_0`` = the Lebesgue volume of the angles)."""
    n_links = 2 * shape[0] * shape[1]

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        return 2 * math.pi * torch.rand((n, 2, *shape), generator=g, dtype=torch.float64) - math.pi

    return CouplingPath(
        draw,
        n_links * math.log(2 * math.pi),
        lambda x, t: -t * theory.action(x),
        lambda x: (torch.zeros(x.shape[0], dtype=x.dtype), -theory.action(x)),
        lambda x, t: t * theory.force(x),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="K,TRAJ,THRESHOLD,POWER")
    ap.add_argument("--beta", type=float, default=7.0)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--particles", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("command: python benchmarks/u1_smc_schedules.py " + " ".join(sys.argv[1:] if argv is None else argv))
    shape = (args.L, args.L)
    theory = U1GaugeAction(U1Params(args.beta), Lattice(shape))
    path = haar_path(theory, shape)
    q2 = exact_q2(args.beta, shape)
    p, n = args.runs, args.particles
    for item in args.configs:
        k, traj, threshold, power = item.split(",")
        kernel = HMCKernel(0.2, 5, int(traj), integrator="omelyan", manifold=U1Angles(), step_jitter=0.1)
        smc = SMC(path, kernel, fixed_schedule(int(k), float(power)), resample_threshold=float(threshold))
        t0 = time.perf_counter()
        r = smc.run(n, torch.Generator().manual_seed(args.seed), n_populations=p)
        per_run = (time.perf_counter() - t0) / p
        q = topological_charge(r.x).double().reshape(p, n)
        q_run = (torch.exp(r.log_w) * q).sum(1)
        n_eff = q2 / float((q_run**2).mean())
        print(
            f"K={k} traj={traj} threshold={threshold} power={power}: {per_run:.2f} s/run, n_eff(Q) {n_eff:.1f}/run, "
            f"{1e3 * per_run / n_eff:.0f} ms/indep. Q, {float(r.n_resampled().double().mean()):.1f} resamplings/run, "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
