"""Wilson Dirac operator: apply throughput against memory bandwidth, and CG iterations vs kappa.

Measured in one process:

(a) streaming memory bandwidth of this machine: ``copy`` (``a = b``) and ``triad``
    (``a = b + s c``) on 256 MB float64 arrays, best of several repetitions, with one torch
    thread and with all threads;
(b) ``WilsonDirac.apply``, the torch path (``backend="torch"``) and the fused compiled kernel
    (``backend="kernel"``) side by side, for 2D L = 64 and 4D 8^4 lattices, U(1) and SU(3) links,
    complex128 and complex64, with the batch chosen so that the minimal traffic of one apply is
    about ``--mbytes`` (out of cache): time per batched apply, ns per site, effective bandwidth
    counting only the minimal traffic (read psi, read U, write D psi: ``B V (2 Ns N + d N^2)``
    complex numbers), and that as a fraction of the triad bandwidth measured in (a) at the same
    thread count; then the even/odd Schur complement: ``M_hat^dag M_hat`` on packed half-lattice
    vectors (``EvenOddWilson.apply_normal_packed``) and on full-lattice vectors with zero odd
    sites (``apply_normal``), against ``D^dag D``, all with the kernel;
(c) CG iterations to a relative residual of 1e-10 on ``D^dagger D`` (plain) and on
    ``M_hat^dagger M_hat`` (even/odd) against kappa, at L = 8 and 16, on U(1) configurations
    from a beta = 2 pure-gauge HMC ensemble (independent chains, a few hundred Omelyan
    trajectories each); mean and max over configurations and the time per batched solve.

Usage::

    python benchmarks/dirac_apply.py              # full run (a few minutes on 1 thread)
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
from latflow.fermions.hopping import hop_tables, kernel_hop
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


GEOMETRIES = (("2D L=64", (64, 64)), ("4D 8^4", (8, 8, 8, 8)))
GROUPS = (("U(1)", 1), ("SU(3)", 3))


def random_links(op: WilsonDirac, batch: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random U(1) phases or Haar-like SU(N) matrices (QR of a Gaussian) ``[batch, *link_shape]``."""
    if op.n_colors == 1:
        theta = 2 * math.pi * torch.rand((batch, *op.link_shape), generator=g, dtype=torch.float64)
        return u1_links(theta).to(dtype)
    z = torch.randn((batch, *op.link_shape), generator=g, dtype=torch.complex128)
    return torch.linalg.qr(z)[0].to(dtype).contiguous()


def config_bytes(op: WilsonDirac, dtype: torch.dtype) -> int:
    """Minimal bytes of one configuration's apply: read psi and U, write D psi."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize * (2 * math.prod(op.field_shape) + math.prod(op.link_shape))


CHUNK_MB = 24.0  # per batched call: every tensor stays below glibc's 32 MB mmap threshold (no page faults)


def chunks(op: WilsonDirac, dtype: torch.dtype, mbytes: float, g: torch.Generator):
    """``(U, psi)`` pairs, each a batch of about ``CHUNK_MB`` of minimal traffic, ``mbytes`` in all.

    Applying the operator to all chunks in turn streams ``mbytes`` through memory (out of cache) while
    each call allocates its result from memory the allocator reuses, as in a Krylov solver.
    """
    per_config = config_bytes(op, dtype)
    batch = max(1, round(CHUNK_MB * 1e6 / per_config))
    n_chunks = max(1, round(mbytes / CHUNK_MB))
    pairs = [(random_links(op, batch, dtype, g), op.gaussian(batch, g, dtype=dtype)) for _ in range(n_chunks)]
    return pairs, batch * n_chunks, batch * n_chunks * per_config


def apply_rows(shape: tuple[int, ...], n_colors: int, dtype: torch.dtype, mbytes: float, repeats: int, seed: int):
    """Seconds per ``apply`` of all chunks for the torch path and the kernel, the total batch and minimal bytes."""
    g = make_generator(seed, sum(shape) + n_colors)
    make = lambda b: WilsonDirac(Lattice(shape), 0.12, n_colors=n_colors, backend=b)  # noqa: E731
    pairs, batch, n_bytes = chunks(make("torch"), dtype, mbytes, g)
    # one operator per chunk, so that each keeps its prepared links cached, as in a solver with fixed links
    ops = {b: [make(b) for _ in pairs] for b in ("torch", "kernel")}
    times = {}
    with torch.no_grad():
        for name, chunk_ops in ops.items():
            times[name] = best_time(lambda: [op.apply(U, psi) for op, (U, psi) in zip(chunk_ops, pairs)], repeats)
        times["out"] = best_time(kernel_into_buffers(ops["kernel"][0], pairs), repeats)
    return times, batch, n_bytes


def kernel_into_buffers(op: WilsonDirac, pairs):
    """``D psi`` by the kernel into preallocated outputs, for every chunk (no allocation, no page faults)."""
    tables = hop_tables(tuple(op.lattice.shape), "all")
    ints, coefs = op._term_tabs[False]
    inner = op.field_shape[op.lattice.dim :]
    flat = [(op.flat_links(U), psi.reshape(psi.shape[0], -1, *inner)) for U, psi in pairs]
    outs = [torch.empty_like(src) for _, src in flat]

    def run():
        for (uf, src), out in zip(flat, outs):
            kernel_hop(tables, ints, coefs, uf, src, -op.kappa, src, op.n_spin, op.n_colors, out=out)

    return run


def schur_rows(shape: tuple[int, ...], n_colors: int, dtype: torch.dtype, mbytes: float, repeats: int, seed: int):
    """Seconds per batched ``D^dag D``, packed ``M_hat^dag M_hat`` and full-lattice ``M_hat^dag M_hat`` (kernel)."""
    g = make_generator(seed, 7 + sum(shape) + n_colors)
    make = lambda: WilsonDirac(Lattice(shape), 0.12, n_colors=n_colors, backend="kernel")  # noqa: E731
    pairs, batch, _ = chunks(make(), dtype, mbytes, g)
    ops = [make() for _ in pairs]  # one per chunk: prepared links stay cached
    eos = [EvenOddWilson(op, check_parity=False) for op in ops]
    packed = [(U, eo.pack(psi)) for eo, (U, psi) in zip(eos, pairs)]
    full_e = [(U, eo.project_even(psi)) for eo, (U, psi) in zip(eos, pairs)]
    with torch.no_grad():
        t_dd = best_time(lambda: [op.apply_normal(U, psi) for op, (U, psi) in zip(ops, pairs)], repeats)
        t_packed = best_time(lambda: [eo.apply_normal_packed(U, x) for eo, (U, x) in zip(eos, packed)], repeats)
        t_full = best_time(lambda: [eo.apply_normal(U, x) for eo, (U, x) in zip(eos, full_e)], repeats)
    return t_dd, t_packed, t_full, batch


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
    p.add_argument("--mbytes", type=float, default=200.0, help="minimal traffic of one batched apply in (b), MB")
    p.add_argument("--cg-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--configs", type=int, default=6, help="HMC chains (configurations) per lattice size")
    p.add_argument("--trajectories", type=int, default=300)
    p.add_argument("--max-iter", type=int, default=20000)
    p.add_argument("--seed", type=int, default=2024)
    args = p.parse_args()
    bw_bytes, repeats = 256 * 2**20, 5
    if args.quick:
        args.mbytes, args.cg_sizes = 24.0, [8]
        args.configs, args.trajectories, args.max_iter = 2, 20, 5000
        bw_bytes, repeats = 32 * 2**20, 2
    all_threads = torch.get_num_threads()
    threads = args.threads if args.threads else all_threads
    print(
        f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{threads} torch thread(s) for (b), (c)"
    )
    malloc = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    print(f"# glibc malloc settings from the environment: {malloc or 'none (defaults)'}")

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
        f"\n## (b) WilsonDirac.apply, torch path vs fused kernel, {threads} thread(s), about {args.mbytes:.0f} MB "
        f"per apply; minimal bytes = read psi + read U + write D psi; fraction of the triad bandwidth above"
    )
    print("# kernel: WilsonDirac.apply with the kernel (allocates its result); out=: kernel into preallocated outputs")
    print(
        f"{'lattice':>8} {'group':>6} {'dtype':>10} {'B':>5} {'MB':>6} | {'torch ms':>9} {'ns/site':>8} "
        f"{'GB/s':>6} {'triad':>6} | {'kernel ms':>9} {'ns/site':>8} {'GB/s':>6} {'triad':>6} | {'speed-up':>8} | "
        f"{'out= ms':>8} {'ns/site':>8} {'GB/s':>6} {'triad':>6}"
    )
    for geo, shape in GEOMETRIES:
        for group, n_colors in GROUPS:
            for dtype in (torch.complex128, torch.complex64):
                times, batch, n_bytes = apply_rows(shape, n_colors, dtype, args.mbytes, repeats, args.seed)
                sites = batch * math.prod(shape)
                cols = []
                for name in ("torch", "kernel", "out"):
                    t = times[name]
                    gbs = n_bytes / t / 1e9
                    cols.append(f"{1e3 * t:>9.2f} {1e9 * t / sites:>8.2f} {gbs:>6.2f} {gbs / ref:>6.1%}")
                print(
                    f"{geo:>8} {group:>6} {str(dtype).split('.')[-1]:>10} {batch:>5} {n_bytes / 1e6:>6.0f} | "
                    f"{cols[0]} | {cols[1]} | {times['torch'] / times['kernel']:>7.1f}x | {cols[2]}"
                )

    print(
        f"\n## (b2) even/odd cost with the kernel, {threads} thread(s): D^dag D (full lattice) vs M_hat^dag M_hat on "
        "packed half-lattice vectors and on full-lattice vectors with zero odd sites"
    )
    print(
        f"{'lattice':>8} {'group':>6} {'dtype':>10} {'B':>5} | {'DdagD ms':>9} {'packed ms':>10} {'ratio':>6} | "
        f"{'full-lattice eo ms':>18} {'ratio':>6}"
    )
    for geo, shape in GEOMETRIES:
        for group, n_colors in GROUPS:
            for dtype in (torch.complex128, torch.complex64):
                t_dd, t_packed, t_full, batch = schur_rows(shape, n_colors, dtype, args.mbytes, repeats, args.seed)
                print(
                    f"{geo:>8} {group:>6} {str(dtype).split('.')[-1]:>10} {batch:>5} | {1e3 * t_dd:>9.2f} "
                    f"{1e3 * t_packed:>10.2f} {t_packed / t_dd:>6.2f} | {1e3 * t_full:>18.2f} {t_full / t_dd:>6.2f}"
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
