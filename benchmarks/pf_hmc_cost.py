"""PF-HMC cost per trajectory and per unit of acceptance: one time scale against nested time scales, with and
without chronological initial guesses (Schwinger model, beta = 2, L = 16, kappa = 0.26 by default).

Every variant uses even/odd preconditioning and one Hasenbusch factor (kappa' = 0.2 by default), Omelyan,
trajectory length 1, ``--chains`` chains in lock step from the same thermalised start (one-scale PF-HMC,
``--therm`` trajectories from a pure-gauge exact sample), then ``--traj`` measured trajectories. Printed per
variant: acceptance, wall ms per trajectory (all chains), CG iterations per trajectory and chain (all solves),
``<|dH|>``, and the cost per unit of acceptance ``ms / acceptance`` (and ``CG iterations / acceptance``, which
does not depend on the machine's load).

Usage::

    python benchmarks/pf_hmc_cost.py                  # the BENCHMARKS.md run
    python benchmarks/pf_hmc_cost.py --quick          # L = 8, a few trajectories: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from latflow.lattice import Lattice
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.theories.u1 import sample_exact_2d

# (label, n_steps, time_scales, chrono)
VARIANTS = [
    ("one scale, n=8", 8, (), 0),
    ("one scale, n=8, chrono 3", 8, (), 3),
    ("nested [2,1], n=4", 4, (2, 1), 0),
    ("nested [2,1], n=4, chrono 3", 4, (2, 1), 3),
    ("nested [4,1], n=3", 3, (4, 1), 0),
    ("nested [4,1], n=3, chrono 3", 3, (4, 1), 3),
    ("nested [4,2], n=2, chrono 3", 2, (4, 2), 3),
]


def point_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options of the Schwinger benchmark point and its thermalised start (shared with
    ``pf_hmc_speedup.py``)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--kappa", type=float, default=0.26)
    ap.add_argument("--hasenbusch", type=float, default=0.2)
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--therm", type=int, default=20)
    ap.add_argument("--traj", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    return ap


def thermalised_start(a: argparse.Namespace) -> tuple[SchwingerModel, dict, torch.Tensor]:
    """``(model, common sampler options, thermalised chains)``: ``a.therm`` one-scale PF-HMC trajectories from a
    pure-gauge exact sample; prints the header lines."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m = SchwingerModel(SchwingerParams(a.beta, a.kappa), Lattice((a.L, a.L)))
    common = dict(even_odd=True, hasenbusch_kappas=(a.hasenbusch,), tol=a.tol, step_jitter=0.1)
    g = torch.Generator().manual_seed(a.seed)
    x0 = sample_exact_2d(a.beta, (a.L, a.L), a.chains, g)
    warm = PseudofermionHMC.for_theory(m, x0, step_size=1 / 8, n_steps=8, generator=g, **common)
    therm_acc = warm.run(a.therm).accepted.double().mean().item()
    print(
        f"# L = {a.L}, beta = {a.beta}, kappa = {a.kappa}, Hasenbusch kappa' = {a.hasenbusch}, even/odd, Omelyan, "
        f"tau = 1, {a.chains} chains, {a.traj} trajectories, tol {a.tol:g}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.machine()}, load {os.getloadavg()[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    print(f"# thermalisation: {a.therm} one-scale trajectories, acceptance {therm_acc:.2f}", flush=True)
    return m, common, warm.x


def main() -> None:
    a = point_arguments(__doc__.splitlines()[0]).parse_args()
    if a.quick:
        a.L, a.chains, a.therm, a.traj = 8, 2, 2, 2
    m, common, start = thermalised_start(a)
    header = f"{'variant':32s} {'acc':>5s} {'<|dH|>':>7s} {'ms/traj':>8s} {'CG/traj':>8s} {'ms/acc':>8s} {'CG/acc':>8s}"
    print(header)
    for label, n, scales, chrono in VARIANTS:
        s = PseudofermionHMC.for_theory(
            m,
            start,
            step_size=1.0 / n,
            n_steps=n,
            generator=torch.Generator().manual_seed(a.seed + 1),
            time_scales=scales,
            chrono=chrono,
            **common,
        )
        t0 = time.perf_counter()
        rows = s.run(a.traj)
        ms = 1e3 * (time.perf_counter() - t0) / a.traj
        acc = rows.accepted.double().mean().item()
        cg = s.last_run_cg_iterations.double().mean().item()
        dh = s.last_run_delta_h.abs().mean().item()
        div = max(acc, 1e-9)
        print(f"{label:32s} {acc:5.2f} {dh:7.3f} {ms:8.0f} {cg:8.0f} {ms / div:8.0f} {cg / div:8.0f}", flush=True)


if __name__ == "__main__":
    main()
