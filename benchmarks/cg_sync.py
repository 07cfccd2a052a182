"""CG on the Wilson ``D^dagger D``: time per batched solve, iterations and host syncs, by check interval and precision.

Cases (default sizes): 2D U(1), L = 32, B = 16 configurations; 4D SU(3), 8^4, B = 2. The links are
smooth random fields (``exp`` of Gaussian algebra elements of width ``--width``), kappa below the
free critical value so that CG needs a few hundred iterations. For each case four solvers reach a
relative residual of ``--tol``:

* ``float64 k=1``  -- :func:`latflow.fermions.solvers.cg`, complex128, a host check every iteration;
* ``float64 k=10`` -- the same with ``check_every = 10``;
* ``mixed k=1`` / ``mixed k=10`` -- :func:`latflow.fermions.solvers.cg_mixed` (complex64 inner CG to
  ``inner_tol = 1e-5``, complex128 defect correction).

Columns: best wall time per batched solve over ``--repeats`` (the solvers run round-robin), mean
and max iterations (inner iterations for the mixed solver), host synchronisations (calls of the
solvers' ``_sync_any`` per solve), and the error of the solution against the float64 ``k=1`` one.

Usage::

    python benchmarks/cg_sync.py             # 1-3 minutes on one thread
    python benchmarks/cg_sync.py --quick     # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable

import torch

from latflow.fermions import WilsonDirac, solvers, u1_links
from latflow.lattice import Lattice
from latflow.sun import expm_su, random_algebra


def u1_case(L: int, batch: int, kappa: float, width: float, seed: int):
    """``(op, U [B, 2, L, L], b [B, L, L, 2])`` for smooth 2D U(1) links."""
    g = torch.Generator().manual_seed(seed)
    op = WilsonDirac(Lattice((L, L)), kappa)
    U = u1_links(width * torch.randn((batch, 2, L, L), generator=g, dtype=torch.float64))
    return op, U, op.gaussian(batch, g)


def su3_case(L: int, batch: int, kappa: float, width: float, seed: int):
    """``(op, U [B, 4, L, L, L, L, 3, 3], b [B, L, L, L, L, 4, 3])`` for smooth 4D SU(3) links."""
    g = torch.Generator().manual_seed(seed)
    shape = (L,) * 4
    op = WilsonDirac(Lattice(shape), kappa, n_colors=3)
    U = expm_su(width * random_algebra((batch, 4, *shape), 3, g))
    return op, U, op.gaussian(batch, g)


def counted(fn: Callable[[], solvers.SolverResult]) -> tuple[float, solvers.SolverResult, int]:
    """Wall time of one call of ``fn``, its result and the host syncs (``_sync_any`` calls) it made."""
    count = [0]
    sync_any = solvers._sync_any

    def counting(mask: torch.Tensor) -> bool:
        count[0] += 1
        return sync_any(mask)

    solvers._sync_any = counting
    try:
        t0 = time.perf_counter()
        res = fn()
        return time.perf_counter() - t0, res, count[0]
    finally:
        solvers._sync_any = sync_any


def run_case(name: str, op, U: torch.Tensor, b: torch.Tensor, tol: float, repeats: int, max_iter: int) -> None:
    """Time the four solvers round-robin (so that changes of the machine load hit all alike), print a table."""
    print(f"\n## {name}: B = {b.shape[0]}, field {list(b.shape[1:])}, kappa = {op.kappa}, tol = {tol:g}")
    print(f"{'solver':>14} {'s/solve':>9} {'iter mean':>10} {'iter max':>9} {'syncs':>6} {'|x - x_ref|/|x|':>16}")
    variants = [(solver, k) for solver in ("cg", "cg_mixed") for k in (1, 10)]
    best = dict.fromkeys(variants, math.inf)
    out = {}
    for _ in range(repeats):
        for solver, k in variants:
            t, res, syncs = counted(
                lambda: solvers.solve_normal(op, U, b, solver=solver, tol=tol, max_iter=max_iter, check_every=k)
            )
            best[solver, k] = min(best[solver, k], t)
            out[solver, k] = (res, syncs)
    ref = out["cg", 1][0].x
    for solver, k in variants:
        res, syncs = out[solver, k]
        err = float(((res.x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max())
        its = res.iterations.double()
        label = f"{'float64' if solver == 'cg' else 'mixed'} k={k}"
        t = best[solver, k]
        print(f"{label:>14} {t:>9.3f} {float(its.mean()):>10.1f} {int(its.max()):>9} {syncs:>6} {err:>16.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny lattices (seconds), to check the script runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--width", type=float, default=0.3, help="width of the random link algebra fields")
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    u1_L, u1_B, su3_L, su3_B = 32, 16, 8, 2
    if args.quick:
        u1_L, u1_B, su3_L, su3_B, args.repeats = 8, 2, 2, 1, 1
    print(
        f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    with torch.no_grad():
        op, U, b = u1_case(u1_L, u1_B, 0.24, args.width, args.seed)
        run_case(f"2D U(1) L = {u1_L}", op, U, b, args.tol, args.repeats, 20000)
        op, U, b = su3_case(su3_L, su3_B, 0.115, args.width, args.seed + 1)
        run_case(f"4D SU(3) {su3_L}^4", op, U, b, args.tol, args.repeats, 20000)


if __name__ == "__main__":
    main()
