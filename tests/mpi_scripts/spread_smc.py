"""Run as ``mpiexec -n K python spread_smc.py SEED OUT.json``: SMC and CRAFT with one population spread over ranks.

Exact checks (every rank, against the one-process algorithm run in the same process on the whole population):
without Markov moves the spread run is the serial run, particle for particle, to rounding: the same initial
particles, the same resampling draws (the shared stream has the serial run's seed), the same ``log Z``; systematic
and multinomial resampling, an uneven split, an adaptive schedule, and data-parallel CRAFT training (flows after
three iterations). Any failure prints ``FAIL`` and aborts every rank.

Statistical part: spread SMC with HMC moves on a Gaussian-to-Gaussian path; rank 0 writes each population's
``log Z`` and weighted ``<x>`` to ``OUT.json`` for the test to compare with the exact values.
"""

from __future__ import annotations

import json
import math
import sys
import traceback

import torch

from latflow.lattice import Lattice
from latflow.mpi import get_comm
from latflow.priors import NormalPrior
from latflow.samplers.annealing import (
    CRAFT,
    SMC,
    AdaptiveSchedule,
    GeometricPath,
    HMCKernel,
    SpreadPopulation,
    StepSize,
    affine_transport,
)

F64 = torch.float64
D, MU, SIGMA = 6, 1.5, 0.6


def gaussian_path() -> GeometricPath:
    return GeometricPath(NormalPrior((D,)), lambda x: -0.5 * ((x - MU) / SIGMA).pow(2).sum(dim=1))


class Failure(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


def local_slice(full: torch.Tensor, p: int, pop: SpreadPopulation) -> torch.Tensor:
    """This rank's rows ``[P * n_local, ...]`` of population-major particles ``[P * N, ...]``."""
    shaped = full.reshape(p, pop.n_total, *full.shape[1:])
    return shaped[:, pop.offset : pop.offset + pop.n_local].reshape(-1, *full.shape[1:])


def gathered(comm, local: torch.Tensor, p: int) -> torch.Tensor:
    """Population-major ``[P * N, ...]`` from every rank's slice ``[P * n_local, ...]``."""
    parts = comm.comm.allgather(local.detach().cpu())
    return torch.cat([q.reshape(p, -1, *q.shape[1:]) for q in parts], dim=1).reshape(-1, *local.shape[1:])


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-12) -> None:
    scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
    check(a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    check(bool((a - b).abs().max() <= tol * scale), f"{what}: max difference {float((a - b).abs().max()):.3e}")


def exact_smc(comm, seed: int) -> None:
    """Serial and spread SMC without moves agree particle for particle."""
    for n, resampling, schedule in ((16, "systematic", 12), (13, "multinomial", 12), (16, "systematic", None)):
        p = 3
        x0 = torch.randn(p * n, D, generator=torch.Generator().manual_seed(seed + n), dtype=F64)
        sched = AdaptiveSchedule(0.8) if schedule is None else schedule
        smc = SMC(gaussian_path(), None, sched, resample_threshold=0.9, resampling=resampling)
        ref = smc.run(n, torch.Generator().manual_seed(seed), n_populations=p, x0=x0)
        pop = SpreadPopulation(comm, n, shared_seed=seed)
        res = smc.run(n, torch.Generator().manual_seed(seed + 1000 + comm.rank), n_populations=p,
                      x0=local_slice(x0, p, pop), population=pop)  # fmt: skip
        what = f"SMC N={n} {resampling} {'adaptive' if schedule is None else 'fixed'}"
        check(res.ts == ref.ts, f"{what}: schedules differ {res.ts} != {ref.ts}")
        check(all(bool((a == b).all()) for a, b in zip(res.resampled, ref.resampled)), f"{what}: resampling differs")
        check(int(ref.n_resampled().sum()) > 0, f"{what}: the check should resample")
        close(gathered(comm, res.x, p), ref.x, f"{what}: particles")
        close(gathered(comm, res.log_w.reshape(-1), p).reshape(p, n), ref.log_w, f"{what}: log W")
        close(res.log_z, ref.log_z, f"{what}: log Z")
        close(res.final_ess(), ref.final_ess(), f"{what}: ESS")


def exact_craft(comm, seed: int) -> None:
    """Data-parallel CRAFT training (particles spread) gives the serial run's flows and log Z."""
    shape, p, n = (4, 4), 2, 12
    lattice = Lattice(shape)

    def target(x: torch.Tensor) -> torch.Tensor:
        kinetic = sum(x * (2 * x - torch.roll(x, 1, mu) - torch.roll(x, -1, mu)) for mu in (1, 2))
        return -(kinetic + 1.5 * x**2 + 0.3 * x**4).flatten(1).sum(1)

    def make() -> CRAFT:
        torch.manual_seed(seed)
        flows = [affine_transport(lattice, 2, (4,), 3) for _ in range(3)]
        for f in flows:  # start away from the identity so that every layer has a gradient
            for q in f.parameters():
                q.data.normal_(0.0, 0.05)
        return CRAFT(GeometricPath(NormalPrior(shape), target), None, 3, flows, resample_threshold=0.9, lr=1e-2)

    serial, spread = make(), make()
    pop = SpreadPopulation(comm, n, shared_seed=seed)
    draws = torch.Generator().manual_seed(seed)  # the serial run's resampling stream: the spread run's shared one
    for it in range(3):
        x0 = torch.randn(p * n, *shape, generator=torch.Generator().manual_seed(seed + it), dtype=F64)
        a = serial.train_iteration(n, draws, n_populations=p, x0=x0)
        b = spread.train_iteration(n, torch.Generator().manual_seed(seed + 7 + comm.rank), n_populations=p,
                                   x0=local_slice(x0, p, pop), population=pop)  # fmt: skip
        close(b.log_z, a.log_z, f"CRAFT iteration {it}: log Z", 1e-10)
        close(torch.tensor(b.extra["loss"]), torch.tensor(a.extra["loss"]), f"CRAFT iteration {it}: losses", 1e-10)
    for (name, q), q_ref in zip(spread.flows.named_parameters(), serial.flows.parameters()):
        close(q.detach(), q_ref.detach(), f"CRAFT flow parameter {name}", 1e-9)
    mine = torch.cat([q.detach().reshape(-1) for q in spread.flows.parameters()])
    other = comm.comm.bcast(mine, root=0)
    check(bool((mine == other).all()), "CRAFT: the ranks' flows differ")


def statistical(comm, seed: int) -> dict:
    """Spread SMC with HMC moves: every population's log Z and weighted <x> (for the test's z-scores)."""
    p, n = 24, 96
    smc = SMC(gaussian_path(), HMCKernel(StepSize([0.5, 0.3]), 4), 12, resample_threshold=0.5)
    pop = SpreadPopulation(comm, n, shared_seed=seed)
    res = smc.run(n, torch.Generator().manual_seed(seed * 31 + comm.rank + 1), n_populations=p, population=pop)
    local = (torch.exp(res.log_w) * res.x.mean(1).reshape(p, -1)).sum(1)  # this rank's part of sum_i W_i <x>_i
    mean_x = [float(math.fsum(v)) for v in zip(*comm.comm.allgather(local.tolist()))]
    return {
        "log_z": res.log_z.tolist(),
        "mean_x": mean_x,
        "n_resampled": int(res.n_resampled().sum()),
        "acceptance": res.acceptance,
        "exact_log_z": 0.5 * D * math.log(2 * math.pi * SIGMA**2),
        "exact_x": MU,
    }


def main() -> None:
    seed, out = int(sys.argv[1]), sys.argv[2]
    comm = get_comm()
    torch.set_num_threads(1)
    try:
        check(comm.size > 1, "run under mpiexec with more than one rank")
        exact_smc(comm, seed)
        exact_craft(comm, seed)
        result = statistical(comm, seed)
    except Exception as exc:  # noqa: BLE001 - any failure must end every rank
        traceback.print_exc()
        print(f"FAIL rank={comm.rank}: {exc}", flush=True)
        comm.abort(1)
        return
    if comm.is_root:
        with open(out, "w") as f:
            json.dump(result, f)
    print(f"SPREAD_SMC_OK rank={comm.rank} size={comm.size}", flush=True)


if __name__ == "__main__":
    main()
