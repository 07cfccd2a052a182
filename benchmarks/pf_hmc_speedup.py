"""PF-HMC before and after the speed work, side by side in one process (Schwinger model, beta = 2, L = 16,
kappa = 0.26, even/odd with one Hasenbusch factor kappa' = 0.2: the Schwinger benchmark point).

Variants (all Omelyan, trajectory length 1, step jitter 0.1, CG tolerance 1e-10, ``--chains`` chains from one
thermalised start):

- ``before``: the code path of the previous release, reproduced here: torch kernels only
  (``LATFLOW_KERNELS=off``), the even/odd Schur complement on full-lattice fields with zero odd sites (every hop
  over all sites), one time scale with 8 steps, zero initial guesses (the CG itself is today's, so the cut in
  its per-iteration overhead is not counted in the speed-ups: they are conservative);
- ``kernels``: the same algorithm with the compiled hopping and gauge-force kernels and packed half-lattice
  even/odd fields;
- ``+ nested``: and nested time scales ``[2, 1]`` with 4 outer steps and chronological guesses (3 solutions);
- ``+ mixed``: and mixed-precision CG (complex64 inner solves, complex128 defect correction);
- ``nested [4, 1]``: 3 outer steps (cheaper, lower acceptance), with and without mixed precision.

Printed per variant: acceptance, ``<|dH|>``, CPU seconds per trajectory (all chains; the process CPU clock, one
torch thread, so other jobs on the machine disturb it little), CG iterations per trajectory and chain (every
solve), and the costs per unit of acceptance; then the speed-up of each variant over ``before``. The variants
run round-robin ``--repeats`` times, and the best time of each is kept.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/pf_hmc_speedup.py              # the BENCHMARKS.md run (~10 min)
    OMP_NUM_THREADS=1 python benchmarks/pf_hmc_speedup.py --quick      # L = 8, a few trajectories
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any

import torch
from pf_hmc_cost import point_arguments, thermalised_start

from latflow.kernels import available
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.schwinger import SchwingerModel

# (label, legacy path, n_steps, time_scales, chrono, solver)
VARIANTS = [
    ("before (torch, full-lattice e/o)", True, 8, (), 0, "cg"),
    ("kernels + half-lattice e/o", False, 8, (), 0, "cg"),
    ("+ nested [2,1] n=4, chrono 3", False, 4, (2, 1), 3, "cg"),
    ("+ mixed-precision CG", False, 4, (2, 1), 3, "cg_mixed"),
    ("nested [4,1] n=3, chrono 3", False, 3, (4, 1), 3, "cg"),
    ("nested [4,1] n=3, chrono 3, mixed", False, 3, (4, 1), 3, "cg_mixed"),
]


@contextmanager
def kernels_off(off: bool):
    """``LATFLOW_KERNELS=off`` inside the block when ``off`` (read at every call)."""
    old = os.environ.get("LATFLOW_KERNELS")
    if off:
        os.environ["LATFLOW_KERNELS"] = "off"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LATFLOW_KERNELS", None)
        else:
            os.environ["LATFLOW_KERNELS"] = old


def full_lattice_even_odd(sampler: PseudofermionHMC) -> None:
    """Make every even/odd factor solve on full-lattice fields with zero odd sites, as the previous release did."""
    for f in sampler.pseudofermions.factors:
        for op in (f.op, getattr(f, "op_heavy", None)):
            if op is None or not hasattr(op, "eo"):
                continue
            op.pack = lambda psi: psi
            op.unpack = lambda v: v
            op.normal = lambda U, op=op: lambda v: op.eo.apply_normal(U, v)


def build(m: SchwingerModel, x0: torch.Tensor, variant: tuple, common: dict, seed: int) -> PseudofermionHMC:
    _, legacy, n, scales, chrono, solver = variant
    s = PseudofermionHMC.for_theory(
        m,
        x0,
        step_size=1.0 / n,
        n_steps=n,
        generator=torch.Generator().manual_seed(seed),
        time_scales=scales,
        chrono=chrono,
        solver=solver,
        **common,
    )
    if legacy:
        full_lattice_even_odd(s)
    return s


def measure(m: SchwingerModel, x0: torch.Tensor, variant: tuple, common: dict, a: Any) -> dict[str, float]:
    with kernels_off(variant[1]):
        s = build(m, x0, variant, common, a.seed + 1)
        c0, t0 = time.process_time(), time.perf_counter()
        rows = s.run(a.traj)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {
        "acc": rows.accepted.double().mean().item(),
        "dh": s.last_run_delta_h.abs().mean().item(),
        "cpu": cpu / a.traj,
        "wall": wall / a.traj,
        "cg": s.last_run_cg_iterations.double().mean().item(),
    }


def main() -> None:
    ap = point_arguments(__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.quick:
        a.L, a.chains, a.therm, a.traj, a.repeats = 8, 2, 2, 2, 1
    m, common, start = thermalised_start(a)
    print(f"# {a.repeats} repeats; compiled hop kernel {'yes' if available('wilson_hop') else 'NO'}", flush=True)
    best: dict[str, dict[str, float]] = {}
    for _ in range(a.repeats):
        for v in VARIANTS:
            r = measure(m, start, v, common, a)
            if v[0] not in best or r["cpu"] < best[v[0]]["cpu"]:
                best[v[0]] = r
    print(
        f"{'variant':36s} {'acc':>5s} {'<|dH|>':>7s} {'s/traj':>7s} {'wall':>7s} {'CG/traj':>8s} "
        f"{'s/acc':>7s} {'CG/acc':>7s} {'speed-up':>9s}"
    )
    base = best[VARIANTS[0][0]]
    base_cost = base["cpu"] / max(base["acc"], 1e-9)
    for v in VARIANTS:
        r = best[v[0]]
        div = max(r["acc"], 1e-9)
        print(
            f"{v[0]:36s} {r['acc']:5.2f} {r['dh']:7.3f} {r['cpu']:7.2f} {r['wall']:7.2f} {r['cg']:8.0f} "
            f"{r['cpu'] / div:7.2f} {r['cg'] / div:7.0f} {base_cost / (r['cpu'] / div):8.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
