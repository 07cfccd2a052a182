"""The GPU path, measured in one run: Dirac apply against the device's bandwidth, CG, HMC and flow throughput.

One table (markdown), every row measured in this process on ``--device`` (default: ``cuda`` if available, else
``cpu``) in ``--dtype`` (default: ``complex64`` on a GPU, ``complex128`` on the CPU):

- ``triad``: streaming bandwidth of the device, ``torch.add(a, b, alpha=s, out=c)`` on three large real arrays
  (1 GiB each on a GPU), best of several, counting ``3 n`` element transfers;
- ``Wilson D``: :meth:`latflow.fermions.wilson.WilsonDirac.apply` for 2D U(1) (L = 64, 128, 256) and 4D SU(3)
  (8^4, 12^4, 16^4), the batch grown until the minimal traffic of one apply is ``--target-gb`` (halved while
  the device runs out of memory): ms per batched apply, the effective GB/s of the minimal traffic (read psi and
  U once, write D psi: ``B V (2 Ns N + d N^2)`` complex numbers) and that as a fraction of the triad;
- ``EO normal``: :meth:`latflow.fermions.evenodd.EvenOddWilson.apply_normal_packed` (``M_hat^dag M_hat`` on
  packed half-lattice vectors) on the same lattices, minimal traffic read x (``V/2`` sites) and U once, write the
  result (it hops four times over half the lattice, i.e. about two full ``D`` worth of work);
- ``CG``: :func:`latflow.fermions.solvers.cg` on ``D^dag D`` to a relative residual of 1e-10 (complex128) or
  1e-5 (complex64), ``check_every`` = 1 and 10: ms per batched solve, iterations (mean/max over the batch) and the
  host reads, counted by wrapping :func:`latflow.fermions.solvers._sync_any` (the solver's final check of the true
  residual is one more read, not counted);
- ``PF-HMC``: Schwinger-model pseudofermion HMC (:meth:`latflow.samplers.pf_hmc.PseudofermionHMC.for_theory`,
  even/odd, one Hasenbusch factor, Omelyan, nested time scales [2, 1], chronological guesses), float64 links; the
  solver is ``cg`` for complex128 and ``cg_mixed`` (complex64 inner CG, double defect correction) for complex64;
  trajectories per second counted over all chains, and host reads (``_sync_any``) per trajectory;
- ``SU(3) HMC``: pure-gauge HMC in 4D at beta = 6 (random start, Omelyan, trajectory length 1, force
  ``SUNGaugeAction.force``), trajectories per second over all chains;
- ``flow``: proposals per second of a U(1) gauge-equivariant flow (8 NCP couplings on a Haar prior,
  :func:`latflow.flows.gauge_layers.make_u1_equivariant_flow`): sample with ``log q`` and the action for
  ``log p`` (what one independence-Metropolis proposal costs), batch sizes 256 .. 8192.

Configurations: random links (U(1) phases or ``exp`` of Gaussian su(3) elements), generated for at most 8
configurations and tiled to the batch (the values do not change the cost; CG then shows 8 distinct iteration
counts). Timing: ``torch.cuda.synchronize()`` around each timed block on a GPU, ``time.perf_counter`` on both.
Rows are printed as they are measured (a run cut short keeps what it has); a row that fails prints its error in
the table, the run goes on, and the script exits with status 1 at the end (tracebacks on stderr).
``--only`` restricts the run to some sections.

Usage::

    python benchmarks/gpu_path.py                          # on a GPU: all rows (sized for minutes; not yet run)
    python benchmarks/gpu_path.py --dtype complex128       # double precision
    python benchmarks/gpu_path.py --device cpu --quick     # tiny sizes, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from latflow.fermions import EvenOddWilson, WilsonDirac, solvers, u1_links
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.lattice import Lattice
from latflow.samplers import HMC
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.sun import expm_su, random_algebra
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.theories.su3 import SUNGaugeAction, SUNParams
from latflow.theories.u1 import U1GaugeAction, U1Params, sample_exact_2d

GiB = 1 << 30
Row = list[str]  # section, case, batch, time, rate, detail
DISTINCT = 8  # distinct random configurations, tiled to the batch


@dataclass
class Settings:
    """Sizes of one run (``quick`` shrinks everything)."""

    u1_L: tuple[int, ...] = (64, 128, 256)
    su3_L: tuple[int, ...] = (8, 12, 16)
    target_bytes: int = 2 * GiB
    triad_bytes: int = GiB
    cg_u1_L: int = 128
    cg_su3_L: int = 12
    cg_target_bytes: int = GiB // 2
    pf_L: int = 16
    pf_chains: int = 4096
    pf_traj: int = 2
    hmc_L: int = 8
    hmc_chains: int = 512
    hmc_traj: int = 2
    flow_L: int = 16
    flow_layers: int = 8
    flow_batches: tuple[int, ...] = (256, 1024, 4096, 8192)
    reps: int = 5
    max_batch: int = 1 << 16
    exact_batch: int | None = None  # quick runs: this batch everywhere instead of filling the device


def settings_for(device: torch.device, quick: bool, target_gb: float | None) -> Settings:
    """Default sizes for the device; ``quick``: tiny lattices and batches (seconds on a CPU)."""
    s = Settings()
    if device.type == "cpu":
        s.target_bytes, s.triad_bytes, s.cg_target_bytes = GiB // 4, GiB // 4, GiB // 32
        s.pf_chains, s.hmc_chains, s.hmc_L = 8, 4, 4
        s.flow_batches = (256, 1024)
        s.reps = 3
    if quick:
        s.u1_L, s.su3_L, s.cg_u1_L, s.cg_su3_L = (8, 16), (4,), 8, 4
        s.triad_bytes, s.exact_batch = 16 << 20, 2
        s.pf_L, s.pf_chains, s.pf_traj = 8, 2, 1
        s.hmc_L, s.hmc_chains, s.hmc_traj = 4, 2, 1
        s.flow_L, s.flow_layers, s.flow_batches = 8, 2, (16, 64)
        s.reps = 2
    if target_gb is not None:
        s.target_bytes = int(target_gb * GiB)
    return s


# --- timing and memory --------------------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a GPU, a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def best_time(fn: Callable[[], object], sync: Callable[[], None], reps: int, block_s: float = 0.02) -> float:
    """Best wall time per call of ``fn`` over ``reps`` blocks of calls (each block about ``block_s`` long)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    inner = max(1, min(100, int(block_s / max(time.perf_counter() - t0, 1e-9))))
    best = math.inf
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fill_batch(per_item_bytes: float, target_bytes: int, s: Settings) -> int:
    """Batch whose minimal traffic is about ``target_bytes`` (``s.exact_batch`` in quick runs)."""
    if s.exact_batch is not None:
        return s.exact_batch
    return int(max(1, min(s.max_batch, target_bytes // max(1, int(per_item_bytes)))))


def shrinking(batch: int, device: torch.device, measure: Callable[[int], list[Row]]) -> list[Row]:
    """``measure(batch)``, halving ``batch`` while the device is out of memory."""
    while True:
        oom = False
        try:
            return measure(batch)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            oom = True
        if oom:
            free_memory(device)
            batch //= 2


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[int]]:
    """Count the calls of the solvers' one host synchronisation, ``latflow.fermions.solvers._sync_any``.

    Inside, ``cg`` keeps to the device-scalar solver (the GPU path) also for CPU tensors: with ``check_every`` 1
    the CPU would otherwise take its host-scalar CG (:mod:`latflow.fermions.cg_cpu`), which reads no flag."""
    count = [0]
    original, usable = solvers._sync_any, solvers.cg_cpu.usable

    def counted(mask: torch.Tensor) -> bool:
        count[0] += 1
        return original(mask)

    solvers._sync_any = counted
    solvers.cg_cpu.usable = lambda b, x0: False
    try:
        yield count
    finally:
        solvers._sync_any = original
        solvers.cg_cpu.usable = usable


# --- configurations ---------------------------------------------------------------------------------------------
def real_dtype(cdtype: torch.dtype) -> torch.dtype:
    return torch.float32 if cdtype == torch.complex64 else torch.float64


def random_links(op: WilsonDirac, batch: int, cdtype: torch.dtype, gen: torch.Generator, width: float) -> torch.Tensor:
    """Links ``[batch, *link_shape]``: ``min(batch, 8)`` random configurations tiled to ``batch``.

    U(1): phases ``exp(i width z)``, ``z`` standard normal (``width = inf``: uniform phases); SU(N):
    ``exp(width P)`` with Gaussian su(N) ``P``.
    """
    n = min(batch, DISTINCT)
    device = gen.device
    if op.n_colors == 1:
        shape = (n, *op.link_shape)
        if math.isinf(width):
            theta = (2 * math.pi) * torch.rand(shape, generator=gen, dtype=real_dtype(cdtype), device=device)
        else:
            theta = width * torch.randn(shape, generator=gen, dtype=real_dtype(cdtype), device=device)
        u = u1_links(theta)
    else:
        p = random_algebra((n, *op.link_shape[:-2]), op.n_colors, gen, dtype=cdtype, device=device)
        u = expm_su(min(width, 3.0) * p)
    reps = -(-batch // n)
    return u.repeat(reps, *([1] * (u.dim() - 1)))[:batch].contiguous()


def item_bytes(cdtype: torch.dtype) -> int:
    return torch.empty((), dtype=cdtype).element_size()


# --- rows -------------------------------------------------------------------------------------------------------


def row(section: str, case: str, batch: object, time_s: str, rate: str, detail: str) -> Row:
    return [section, case, str(batch), time_s, rate, detail]


def triad_row(device: torch.device, cdtype: torch.dtype, s: Settings, sync: Callable[[], None]) -> tuple[Row, float]:
    """Streaming triad ``c = a + s b`` on three arrays of ``s.triad_bytes``: (row, GB/s)."""
    rdt = real_dtype(cdtype)
    n = s.triad_bytes // torch.empty((), dtype=rdt).element_size()
    a = torch.rand(n, dtype=rdt, device=device)
    b = torch.rand(n, dtype=rdt, device=device)
    c = torch.empty_like(a)
    t = best_time(lambda: torch.add(a, b, alpha=0.5, out=c), sync, max(s.reps, 5))
    gbs = 3 * n * a.element_size() / t / 1e9
    detail = f"3 x {s.triad_bytes / GiB:.3g} GiB {str(rdt).replace('torch.', '')}, best of {max(s.reps, 5)}"
    return row("triad", "c = a + s b", "-", f"{1e3 * t:.3f} ms", f"{gbs:.1f} GB/s", detail), gbs


def dirac_cases(s: Settings) -> list[tuple[str, tuple[int, ...], int]]:
    """(label, lattice shape, N) for the apply rows."""
    cases = [(f"2D U(1) L={L}", (L, L), 1) for L in s.u1_L]
    return cases + [(f"4D SU(3) {L}^4", (L,) * 4, 3) for L in s.su3_L]


def apply_rows(
    label: str, shape: tuple[int, ...], n: int, cdtype: torch.dtype, s: Settings, device, sync, triad: float
) -> list[Row]:
    """Wilson ``D`` and the packed even/odd normal operator on one lattice."""
    lat = Lattice(shape)
    op = WilsonDirac(lat, 0.12 if len(shape) == 4 else 0.24, n_colors=n)
    eo = EvenOddWilson(op)
    v, d, ns, isz = lat.volume, lat.dim, op.n_spin, item_bytes(cdtype)
    link_bytes = d * v * n * n * isz
    wilson_bytes = 2 * v * ns * n * isz + link_bytes
    eo_bytes = 2 * (v // 2) * ns * n * isz + link_bytes
    gen = torch.Generator(device=device).manual_seed(11)
    out = []

    def measure(kind: str, per_item: int) -> Callable[[int], list[Row]]:
        def run(batch: int) -> list[Row]:
            with torch.no_grad():
                U = random_links(op, batch, cdtype, gen, math.inf)
                psi = op.gaussian(batch, gen, dtype=cdtype, device=device)
                if kind == "Wilson D":
                    t = best_time(lambda: op.apply(U, psi), sync, s.reps)
                else:
                    x = eo.pack(psi)
                    del psi
                    t = best_time(lambda: eo.apply_normal_packed(U, x), sync, s.reps)
            gbs = batch * per_item / t / 1e9
            frac = gbs / triad
            detail = f"{gbs:.1f} GB/s = {frac:.3f} of triad; minimal traffic {batch * per_item / 1e6:.4g} MB"
            return [row(kind, label, batch, f"{1e3 * t:.3f} ms", f"{1e9 * t / (batch * v):.2f} ns/site", detail)]

        return run

    for kind, per_item in (("Wilson D", wilson_bytes), ("EO normal", eo_bytes)):
        batch = fill_batch(per_item, s.target_bytes, s)
        out += guarded(kind, label, lambda b=batch, k=kind, p=per_item: shrinking(b, device, measure(k, p)))
        free_memory(device)
    return out


def cg_rows(label: str, shape: tuple[int, ...], n: int, cdtype: torch.dtype, s: Settings, device, sync) -> list[Row]:
    """CG on ``D^dag D`` with ``check_every`` 1 and 10: time per solve, iterations, host reads."""
    lat = Lattice(shape)
    kappa = 0.115 if len(shape) == 4 else 0.24
    op = WilsonDirac(lat, kappa, n_colors=n)
    tol = 1e-10 if cdtype == torch.complex128 else 1e-5
    per_item = 2 * lat.volume * op.n_spin * n * item_bytes(cdtype) + lat.dim * lat.volume * n * n * item_bytes(cdtype)
    gen = torch.Generator(device=device).manual_seed(12)

    def measure(batch: int) -> list[Row]:
        with torch.no_grad():
            U = random_links(op, batch, cdtype, gen, 0.3)
            b = op.gaussian(batch, gen, dtype=cdtype, device=device)

            def apply(x: torch.Tensor) -> torch.Tensor:
                return op.apply_normal(U, x)

            with contextlib.suppress(solvers.ConvergenceError):
                solvers.cg(apply, b, tol=tol, max_iter=3)  # warm-up (caches, allocator)
            rows = []
            for k in (1, 10):
                best, res, reads = math.inf, None, 0
                for _ in range(1 if device.type == "cpu" else 2):
                    with counting_host_reads() as count:
                        sync()
                        t0 = time.perf_counter()
                        res = solvers.cg(apply, b, tol=tol, max_iter=20000, check_every=k)
                        sync()
                        t = time.perf_counter() - t0
                    best, reads = min(best, t), count[0]
                its = res.iterations.double()
                detail = (
                    f"check_every={k}: iterations {float(its.mean()):.0f} mean / {int(its.max())} max, "
                    f"host reads {reads} (+1 final), {1e3 * best / float(its.max()):.3f} ms/iteration, "
                    f"kappa={kappa}, tol={tol:g}"
                )
                rows.append(row("CG", label, batch, f"{1e3 * best:.1f} ms", f"{batch / best:.1f} solves/s", detail))
            return rows

    batch = fill_batch(per_item, s.cg_target_bytes, s)
    return guarded("CG", label, lambda: shrinking(batch, device, measure))


def pf_hmc_rows(cdtype: torch.dtype, s: Settings, device, sync) -> list[Row]:
    """Schwinger PF-HMC: even/odd, one Hasenbusch factor, time scales [2, 1], chrono 3; trajectories per second."""
    beta, kappa, hasenbusch, n_steps = 2.0, 0.26, 0.2, 4
    solver = "cg" if cdtype == torch.complex128 else "cg_mixed"
    label = f"Schwinger L={s.pf_L}"
    model = SchwingerModel(SchwingerParams(beta, kappa), Lattice((s.pf_L, s.pf_L)))

    def measure(chains: int) -> list[Row]:
        x0 = sample_exact_2d(beta, (s.pf_L, s.pf_L), chains, torch.Generator().manual_seed(13)).to(device)
        sampler = PseudofermionHMC.for_theory(
            model,
            x0,
            step_size=1.0 / n_steps,
            n_steps=n_steps,
            generator=torch.Generator(device=device).manual_seed(14),
            even_odd=True,
            hasenbusch_kappas=(hasenbusch,),
            tol=1e-10,
            step_jitter=0.1,
            time_scales=(2, 1),
            chrono=3,
            solver=solver,
        )
        sampler.run(1)
        with counting_host_reads() as count:
            sync()
            t0 = time.perf_counter()
            block = sampler.run(s.pf_traj)
            sync()
            t = (time.perf_counter() - t0) / s.pf_traj
        acc = block.accepted.double().mean().item()
        cg = sampler.last_run_cg_iterations.double().mean().item()
        detail = (
            f"beta={beta}, kappa={kappa}, kappa'={hasenbusch}, Omelyan n={n_steps}, {solver}; acceptance {acc:.2f}, "
            f"CG iterations/traj/chain {cg:.0f}, host reads/traj {count[0] / s.pf_traj:.0f}"
        )
        return [row("PF-HMC", label, chains, f"{t:.3f} s/traj", f"{chains / t:.1f} traj/s", detail)]

    return guarded("PF-HMC", label, lambda: shrinking(s.pf_chains, device, measure))


def su3_hmc_rows(cdtype: torch.dtype, s: Settings, device, sync) -> list[Row]:
    """Pure-gauge SU(3) HMC in 4D at beta = 6 (Omelyan, length 1, analytic force): trajectories per second."""
    beta, n_steps = 6.0, 8
    label = f"4D SU(3) {s.hmc_L}^4"
    theory = SUNGaugeAction(SUNParams(beta, 3), Lattice((s.hmc_L,) * 4))

    def measure(chains: int) -> list[Row]:
        gen = torch.Generator(device=device).manual_seed(15)
        x0 = expm_su(random_algebra((chains, 4, *theory.lattice.shape), 3, gen, dtype=cdtype, device=device))
        hmc = HMC(
            theory.action,
            x0,
            step_size=1.0 / n_steps,
            n_steps=n_steps,
            generator=gen,
            integrator="omelyan",
            step_jitter=0.1,
            force=theory.force,
            manifold=theory.manifold,
        )
        hmc.run(1)
        sync()
        t0 = time.perf_counter()
        block = hmc.run(s.hmc_traj)
        sync()
        t = (time.perf_counter() - t0) / s.hmc_traj
        acc = block.accepted.double().mean().item()
        detail = f"beta={beta}, Omelyan n={n_steps}, random start exp(P), not thermalised (acceptance {acc:.2f})"
        return [row("SU(3) HMC", label, chains, f"{t:.3f} s/traj", f"{chains / t:.1f} traj/s", detail)]

    return guarded("SU(3) HMC", label, lambda: shrinking(s.hmc_chains, device, measure))


def flow_rows(cdtype: torch.dtype, s: Settings, device, sync) -> list[Row]:
    """Proposals per second of a U(1) gauge-equivariant flow: sample, log q, action."""
    torch.manual_seed(16)  # the networks' initial weights
    lat = Lattice((s.flow_L, s.flow_L))
    label = f"2D U(1) L={s.flow_L}, {s.flow_layers} layers"
    rdt = real_dtype(cdtype)
    model = make_u1_equivariant_flow(lat, s.flow_layers, dtype=rdt, device=device)
    theory = U1GaugeAction(U1Params(6.0), lat)
    gen = torch.Generator(device=device).manual_seed(17)
    out = []
    for batch in s.flow_batches:

        def measure(b: int) -> list[Row]:
            def propose() -> torch.Tensor:
                x, log_q = model.sample(b, gen)
                return -theory.action(x) - log_q

            with torch.no_grad():
                t = best_time(propose, sync, s.reps)
            return [row("flow", label, b, f"{1e3 * t:.2f} ms", f"{b / t:.0f} proposals/s", "sample + log q + action")]

        out += guarded("flow", label, lambda b=batch: shrinking(b, device, measure))
        free_memory(device)
    return out


# --- driver -----------------------------------------------------------------------------------------------------
FAILED: list[str] = []


def guarded(section: str, case: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """``fn()``, or one row carrying the error (the run goes on; the exit status becomes 1)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the table
        FAILED.append(f"{section} / {case}: {traceback.format_exc()}")
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return [row(section, case, "-", "-", "-", f"FAILED {msg}")]


def print_rows(rows: list[Row]) -> None:
    """Rows of the markdown table, printed as they are measured (a run cut short keeps what it has)."""
    for r in rows:
        print("| " + " | ".join(r) + " |", flush=True)


def print_table_head() -> None:
    head = ["section", "case", "batch", "time", "rate", "detail"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|", flush=True)


def header(device: torch.device, cdtype: torch.dtype, s: Settings, quick: bool) -> None:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mem = torch.cuda.get_device_properties(device).total_memory / GiB
        where = f"{name} ({mem:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.machine()} {platform.processor() or ''}".strip()
        where += f", {torch.get_num_threads()} torch thread(s)"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mode = "quick smoke run (tiny sizes)" if quick else f"target minimal traffic {s.target_bytes / GiB:.3g} GiB"
    print(f"# device: {where}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {stamp}")
    print(f"# dtype {str(cdtype).replace('torch.', '')}, {mode}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("complex64", "complex128"), default=None, help="default: complex64 on cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU): checks the script runs")
    p.add_argument("--target-gb", type=float, default=None, help="minimal traffic of one batched apply (GiB)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=("apply", "cg", "pf-hmc", "hmc", "flow"),
        default=None,
        help="measure only these sections (the triad always runs)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        print("gpu_path.py: --device cuda: no CUDA device is available (allowed: cuda, cpu)", file=sys.stderr)
        return 2
    device = torch.device(name)
    cdtype = getattr(torch, args.dtype or ("complex64" if name == "cuda" else "complex128"))
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings_for(device, args.quick, args.target_gb)
    sync = synchronizer(device)
    only = set(args.only or ("apply", "cg", "pf-hmc", "hmc", "flow"))
    header(device, cdtype, s, args.quick)
    t_start = time.perf_counter()
    measured: list[float] = []

    def triad() -> list[Row]:
        r, gbs = triad_row(device, cdtype, s, sync)
        measured.append(gbs)
        return [r]

    print_table_head()
    print_rows(guarded("triad", "c = a + s b", triad))
    triad_gbs = measured[0] if measured else float("nan")
    free_memory(device)
    if "apply" in only:
        for label, shape, n in dirac_cases(s):
            print_rows(apply_rows(label, shape, n, cdtype, s, device, sync, triad_gbs))
    if "cg" in only:
        print_rows(cg_rows(f"2D U(1) L={s.cg_u1_L}", (s.cg_u1_L,) * 2, 1, cdtype, s, device, sync))
        free_memory(device)
        print_rows(cg_rows(f"4D SU(3) {s.cg_su3_L}^4", (s.cg_su3_L,) * 4, 3, cdtype, s, device, sync))
        free_memory(device)
    if "pf-hmc" in only:
        print_rows(pf_hmc_rows(cdtype, s, device, sync))
        free_memory(device)
    if "hmc" in only:
        print_rows(su3_hmc_rows(cdtype, s, device, sync))
        free_memory(device)
    if "flow" in only:
        print_rows(flow_rows(cdtype, s, device, sync))
    print(f"# total {time.perf_counter() - t_start:.1f} s")
    for failure in FAILED:
        print(failure, file=sys.stderr)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
