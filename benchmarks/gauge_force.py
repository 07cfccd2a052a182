"""Fused compiled gauge forces and staggered apply against the torch code, and against memory bandwidth.

Measured in one process, with one torch thread unless ``--threads`` says otherwise (times are the best of
several repetitions, in process CPU time with one thread, so that other jobs on a shared machine matter
less, and in wall time with more):

(a) streaming ``triad`` bandwidth (``a = b + s c`` on 256 MB float64 arrays, best of several repetitions);
(b) the Wilson gauge force, torch reference (``force_reference`` / ``gauge_force_reference``) and the fused
    compiled kernel (``force`` / ``gauge_force``, :mod:`latflow.gauge_kernels`) side by side, for U(1)
    angles and SU(3) links at 2D L = 64 (B = 16) and 4D 8^4 (B = 2), in double and single precision: ms per
    batched force, effective GB/s counting only the minimal traffic (read the links once, write the force:
    ``2 x`` the field's bytes) and that as a fraction of the triad bandwidth of (a);
(c) the staggered ``apply`` (``D psi = D_st psi + (m + g sigma) psi``), torch (``hop_reference + _diag``)
    against the fused kernel, without links (Yukawa, with the site mass), with U(1) links (2D) and with
    SU(3) links (4D); minimal traffic: read psi, the links and sigma once, write ``D psi``;
(d) end to end, one batched CG solve of ``D^dagger D`` for the 2D Yukawa operator (L = 32, B = 16), with the
    kernels off (``LATFLOW_KERNELS=off``) and on.

Usage::

    python benchmarks/gauge_force.py              # full run (about a minute on 1 thread)
    python benchmarks/gauge_force.py --quick      # seconds; checks the script runs
    python benchmarks/gauge_force.py --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable

import torch

from latflow.fermions.solvers import cg
from latflow.fermions.staggered import StaggeredDirac
from latflow.fermions.staggered_kernels import compiled_staggered_available
from latflow.gauge_kernels import compiled_force_available
from latflow.lattice import Lattice
from latflow.sun import haar_sun
from latflow.theories.su3_nf2 import SUNNf2Model, SUNNf2Params
from latflow.theories.u1 import U1GaugeAction, U1Params

CASES = [("2D L=64", (64, 64), 16), ("4D 8^4", (8, 8, 8, 8), 2)]


CLOCK: list[Callable[[], float]] = [time.perf_counter]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best time of one call of ``fn`` over ``repeats`` repetitions (after one warm-up call), on ``CLOCK``."""
    clock = CLOCK[0]
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def triad_bandwidth(n_bytes: int, repeats: int) -> float:
    """Triad ``a = b + s c`` bandwidth in GB/s (3 arrays of ``n_bytes / 8`` float64 moved per call)."""
    n = n_bytes // 8
    a = torch.zeros(n, dtype=torch.float64)
    b = torch.rand(n, dtype=torch.float64)
    c = torch.rand(n, dtype=torch.float64)
    t = best_time(lambda: torch.add(b, c, alpha=0.5, out=a), repeats)
    return 3 * n * 8 / t / 1e9


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def force_rows(repeats: int, g: torch.Generator, cases: list) -> list[tuple]:
    """``(group, case, dtype, t_torch, t_fused, minimal bytes)`` per force case."""
    rows = []
    for label, shape, batch in cases:
        lat = Lattice(shape)
        for dtype in (torch.float64, torch.float32):
            theta = ((torch.rand((batch, len(shape), *shape), generator=g, dtype=torch.float64) * 2 - 1) * 3.2).to(
                dtype
            )
            action = U1GaugeAction(U1Params(1.0), lat)
            t_ref = best_time(lambda: action.force_reference(theta), repeats)
            t_new = best_time(lambda: action.force(theta), repeats)
            rows.append(("U(1)", label, str(dtype).split(".")[1], t_ref, t_new, 2 * nbytes(theta)))
        model = SUNNf2Model(SUNNf2Params(beta=5.5, kappa=0.0, n=3), lat)
        for cdtype in (torch.complex128, torch.complex64):
            u = haar_sun((batch, len(shape), *shape), 3, g, dtype=cdtype).contiguous()
            t_ref = best_time(lambda: model.gauge_force_reference(u), max(2, repeats // 4))
            t_new = best_time(lambda: model.gauge_force(u), repeats)
            rows.append(("SU(3)", label, str(cdtype).split(".")[1], t_ref, t_new, 2 * nbytes(u)))
    return rows


def staggered_rows(repeats: int, g: torch.Generator, quick: bool) -> list[tuple]:
    """``(operator, case, dtype, t_torch, t_fused, minimal bytes)`` per staggered apply case."""
    cases = [("no links, Yukawa", None, (64, 64), 16), ("U(1)", 1, (64, 64), 16), ("SU(3)", 3, (8, 8, 8, 8), 2)]
    if quick:
        cases = [(name, nc, tuple(min(n, 8) for n in shape), b) for name, nc, shape, b in cases]
    rows = []
    for name, nc, shape, batch in cases:
        yukawa = 0.5 if nc is None else 0.0
        dirac = StaggeredDirac(Lattice(shape), 0.1, yukawa, n_colors=nc)
        d = len(shape)
        for cdtype in (torch.complex128, torch.complex64):
            real = torch.float64 if cdtype == torch.complex128 else torch.float32
            if nc is None:
                links, x = None, torch.randn((batch, *shape), generator=g, dtype=real)
            elif nc == 1:
                links = torch.polar(
                    torch.ones((batch, d, *shape), dtype=real), torch.randn((batch, d, *shape), dtype=real)
                )
                x = links
            else:
                links = haar_sun((batch, d, *shape), nc, g, dtype=cdtype).contiguous()
                x = links
            psi = torch.randn((batch, *dirac.field_shape), generator=g, dtype=cdtype)
            sigma = x if nc is None else None
            t_ref = best_time(lambda: dirac.hop_reference(x, psi) + dirac._diag(x, psi), repeats)
            t_new = best_time(lambda: dirac.apply(x, psi), repeats)
            rows.append(
                (
                    f"staggered {name}",
                    f"{'x'.join(map(str, shape))} B={batch}",
                    str(cdtype).split(".")[1],
                    t_ref,
                    t_new,
                    2 * nbytes(psi) + nbytes(links, sigma),
                )
            )
    return rows


def cg_solve_row(g: torch.Generator, quick: bool) -> tuple[str, float, float, int, int]:
    """End to end: one batched CG solve of ``D^dagger D`` (Yukawa, 2D, no links), torch apply against fused.

    ``(case, s torch, s fused, iterations torch, iterations fused)``; the torch run sets ``LATFLOW_KERNELS=off``.
    """
    L, batch = (8, 4) if quick else (32, 16)
    dirac = StaggeredDirac(Lattice((L, L)), 0.05, 0.5)
    sigma = 0.3 * torch.randn((batch, L, L), generator=g, dtype=torch.float64)
    rhs = torch.randn((batch, L, L), generator=g, dtype=torch.complex128)
    times, iters = {}, {}
    for mode in ("off", "on"):
        os.environ["LATFLOW_KERNELS"] = mode
        res = []
        times[mode] = best_time(lambda: res.append(cg(lambda v: dirac.apply_normal(sigma, v), rhs, tol=1e-10)), 3)
        iters[mode] = int(res[-1].iterations.max())
    del os.environ["LATFLOW_KERNELS"]
    case = f"Yukawa D^dag D, {L}x{L}, B={batch}, m=0.05, g sigma ~ 0.15"
    return case, times["off"], times["on"], iters["off"], iters["on"]


def print_table(title: str, rows: list[tuple], triad: float) -> None:
    print(f"\n{title}")
    print("| what | lattice | dtype | torch ms | fused ms | speed-up | fused GB/s | of triad |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for what, case, dtype, t_ref, t_new, n in rows:
        gbs = n / t_new / 1e9
        print(
            f"| {what} | {case} | {dtype} | {1e3 * t_ref:.2f} | {1e3 * t_new:.2f} | {t_ref / t_new:.1f}x "
            f"| {gbs:.2f} | {100 * gbs / triad:.0f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch (and kernel) threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # CPU time of the one thread: robust against other jobs on a shared machine
        CLOCK[0] = time.process_time
    clock = "process CPU time" if args.threads == 1 else "wall time"
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)")
    print(f"compiled gauge_force: {compiled_force_available()}, staggered_hop: {compiled_staggered_available()}")
    print(f"times: best of the repetitions, {clock}")
    repeats = 3 if args.quick else 20
    g = torch.Generator().manual_seed(args.seed)
    triad = triad_bandwidth((16 if args.quick else 256) * 2**20, repeats)
    print(f"triad bandwidth: {triad:.2f} GB/s")
    cases = [("2D L=8", (8, 8), 2), ("4D 4^4", (4, 4, 4, 4), 1)] if args.quick else CASES
    print_table("Wilson gauge force (minimal traffic: read links, write force)", force_rows(repeats, g, cases), triad)
    print_table(
        "Staggered apply D psi (minimal traffic: read psi, links, sigma; write D psi)",
        staggered_rows(repeats, g, args.quick),
        triad,
    )
    case, t_ref, t_new, it_ref, it_new = cg_solve_row(g, args.quick)
    print("\nEnd to end: one batched CG solve to 1e-10 (max iterations over the batch)")
    print("| system | torch s | fused s | speed-up | iterations torch / fused |")
    print("|---|---:|---:|---:|---|")
    print(f"| {case} | {t_ref:.3f} | {t_new:.3f} | {t_ref / t_new:.1f}x | {it_ref} / {it_new} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
