"""Wilson Dirac operator: apply throughput against memory bandwidth, and CG iterations vs kappa.

Measured in one process:

(a) streaming memory bandwidth of this machine: ``copy`` (``a = b``) and ``triad``
    (``a = b + s c``) on 256 MB float64 arrays, best of several repetitions, with one torch
    thread and with all threads;
(b) ``WilsonDirac.apply`` for 2D U(1) links at L = 16, 32, 64 with B = 64 configurations, in
    complex128 and complex64: time per batched apply, effective bandwidth counting only the
    minimal traffic (read psi, read U, write D psi: ``B V (2 Ns + d)`` complex numbers), and
    that as a fraction of the triad bandwidth measured in (a) at the same thread count;
(c) CG iterations to a relative residual of 1e-10 on ``D^dagger D`` (plain) and on
    ``M_hat^dagger M_hat`` (even/odd) against kappa, at L = 8 and 16, on U(1) configurations
    from a beta = 2 pure-gauge HMC ensemble (independent chains, a few hundred Omelyan
    trajectories each); mean and max over configurations and the time per batched solve.

Usage::

    python benchmarks/dirac_apply.py              # full run (well under a minute on 1 thread)
    python benchmarks/dirac_apply.py --quick      # seconds; checks the script runs
    python benchmarks/dirac_apply.py --threads 2  # torch threads for (b) and (c)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from latflow.fermions import ConvergenceError, EvenOddWilson, WilsonDirac, cg, u1_links
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import HMC
from latflow.theories.u1 import U1GaugeAction, U1Params, exact_plaquette

KAPPAS = (0.20, 0.24, 0.26, 0.27, 0.276)


def best_time(fn, repeats: int, inner: int = 1) -> float:
    """Best wall time of ``inner`` calls of ``fn`` over ``repeats`` repetitions, per call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def bandwidth(n_bytes: int, repeats: int) -> dict[str, float]:
    """Copy and triad bandwidth (GB/s, counting reads and writes) on arrays of ``n_bytes``."""
    n = n_bytes // 8
    a = torch.zeros(n, dtype=torch.float64)
    b = torch.rand(n, dtype=torch.float64)
    c = torch.rand(n, dtype=torch.float64)
    t_copy = best_time(lambda: a.copy_(b), repeats)
    t_triad = best_time(lambda: torch.add(b, c, alpha=0.5, out=a), repeats)
    return {"copy": 2 * n * 8 / t_copy / 1e9, "triad": 3 * n * 8 / t_triad / 1e9}


def apply_throughput(L: int, batch: int, dtype: torch.dtype, repeats: int, seed: int) -> tuple[float, float]:
    """Seconds per batched ``apply`` and minimal bytes moved by it."""
    g = make_generator(seed, L)
    op = WilsonDirac(Lattice((L, L)), 0.25)
    theta = 2 * math.pi * torch.rand((batch, 2, L, L), generator=g, dtype=torch.float64)
    U = u1_links(theta).to(dtype)
    psi = op.gaussian(batch, g, dtype=dtype)
    with torch.no_grad():
        t = best_time(lambda: op.apply(U, psi), repeats, inner=3)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_bytes = itemsize * (2 * psi.numel() + U.numel())
    return t, n_bytes


def u1_ensemble(L: int, n_configs: int, n_traj: int, seed: int) -> torch.Tensor:
    """``n_configs`` beta = 2 U(1) configurations ``[n, 2, L, L]`` (last state of independent HMC chains)."""
    action = U1GaugeAction(U1Params(beta=2.0), Lattice((L, L)))
    g = make_generator(seed, 100 + L)
    x0 = math.pi * (2 * torch.rand((n_configs, 2, L, L), generator=g, dtype=torch.float64) - 1)
    hmc = HMC(
        action.action,
        x0,
        step_size=0.2,
        n_steps=5,
        generator=g,
        integrator="omelyan",
        force=action.force,
        project=action.project,
        step_jitter=0.1,
    )
    acc = []
    for _ in range(n_traj):
        a, _ = hmc.trajectory()
        acc.append(float(a.float().mean()))
    plaq = action.observables(hmc.x)["plaquette"]
    err = float(plaq.std()) / math.sqrt(n_configs) if n_configs > 1 else float("nan")
    print(
        f"#   L={L}: {n_configs} chains x {n_traj} trajectories, acceptance {sum(acc) / len(acc):.2f}, "
        f"plaquette {float(plaq.mean()):.4f} +- {err:.4f} (exact {exact_plaquette(2.0, (L, L)):.4f})"
    )
    return hmc.x


def cg_row(op, U: torch.Tensor, b: torch.Tensor, max_iter: int) -> str:
    t0 = time.perf_counter()
    try:
        res = cg(lambda v: op.apply_normal(U, v), b, tol=1e-10, max_iter=max_iter)
        its = res.iterations.double()
        note = ""
    except ConvergenceError as exc:
        its = exc.result.iterations.double()
        note = "*"
    dt = time.perf_counter() - t0
    return f"{its.mean():>8.0f}{note:1} {int(its.max()):>6} {1e3 * dt:>10.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), to check the script runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads for (b) and (c) (0: torch default)")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64], help="L for the apply throughput")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cg-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--configs", type=int, default=6, help="HMC chains (configurations) per lattice size")
    p.add_argument("--trajectories", type=int, default=300)
    p.add_argument("--max-iter", type=int, default=20000)
    p.add_argument("--seed", type=int, default=2024)
    args = p.parse_args()
    bw_bytes, repeats = 256 * 2**20, 5
    if args.quick:
        args.sizes, args.batch, args.cg_sizes = [16], 8, [8]
        args.configs, args.trajectories, args.max_iter = 2, 20, 5000
        bw_bytes, repeats = 32 * 2**20, 2
    all_threads = torch.get_num_threads()
    threads = args.threads if args.threads else all_threads
    print(
        f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{threads} torch thread(s) for (b), (c)"
    )

    print(f"\n## (a) streaming bandwidth, {bw_bytes // 2**20} MB float64 arrays, best of {repeats}")
    print(f"{'threads':>8} {'copy GB/s':>10} {'triad GB/s':>11}")
    bws = {}
    for n in sorted({1, all_threads}):
        torch.set_num_threads(n)
        bws[n] = bandwidth(bw_bytes, repeats)
        print(f"{n:>8} {bws[n]['copy']:>10.1f} {bws[n]['triad']:>11.1f}")
    torch.set_num_threads(threads)
    if threads not in bws:
        bws[threads] = bandwidth(bw_bytes, repeats)
        print(f"{threads:>8} {bws[threads]['copy']:>10.1f} {bws[threads]['triad']:>11.1f}")
    ref = bws[threads]["triad"]

    print(
        f"\n## (b) WilsonDirac.apply, 2D U(1), B = {args.batch}, {threads} thread(s); "
        f"minimal bytes = read psi + read U + write D psi"
    )
    print(f"{'L':>4} {'dtype':>10} {'ms/apply':>9} {'ns/site':>8} {'MB moved':>9} {'eff GB/s':>9} {'of triad':>9}")
    for dtype in (torch.complex128, torch.complex64):
        for L in args.sizes:
            t, n_bytes = apply_throughput(L, args.batch, dtype, repeats, args.seed)
            sites = args.batch * L * L
            print(
                f"{L:>4} {str(dtype).split('.')[-1]:>10} {1e3 * t:>9.3f} {1e9 * t / sites:>8.2f} "
                f"{n_bytes / 1e6:>9.2f} {n_bytes / t / 1e9:>9.2f} {n_bytes / t / 1e9 / ref:>8.1%}"
            )

    print(
        f"\n## (c) CG iterations to |r|/|b| < 1e-10, beta = 2 U(1) HMC configurations, complex128, {threads} thread(s)"
    )
    print("# plain: CG on D^dag D (full lattice); even/odd: CG on M_hat^dag M_hat (even sites);")
    print("# mean / max over configurations, ms per batched solve of all configurations; * = some did not converge")
    for L in args.cg_sizes:
        theta = u1_ensemble(L, args.configs, args.trajectories, args.seed)
        U = u1_links(theta)
        g = make_generator(args.seed, 200 + L)
        op0 = WilsonDirac(Lattice((L, L)), KAPPAS[0])
        b = op0.gaussian(args.configs, g)
        print(
            f"{'L':>4} {'kappa':>6} | {'plain mean':>10} {'max':>5} {'ms':>10} | {'eo mean':>9} {'max':>6} {'ms':>10}"
        )
        for kappa in KAPPAS:
            op = WilsonDirac(Lattice((L, L)), kappa)
            eo = EvenOddWilson(op, check_parity=False)
            with torch.no_grad():
                plain = cg_row(op, U, b, args.max_iter)
                even = cg_row(eo, U, eo.project_even(b), args.max_iter)
            print(f"{L:>4} {kappa:>6.3f} | {plain:>23} | {even:>23}")


if __name__ == "__main__":
    main()
