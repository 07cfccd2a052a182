"""Annealing on 1 and 2 MPI ranks: data-parallel CRAFT training, and SMC runs spread over ranks.

Each measurement runs the real command line twice per rank count, a short and a long run of the same job, and
takes the difference, so that start-up (imports, file creation) cancels:

* CRAFT training (``latflow train``, phi^4 8x8, ``train_particles`` particles per iteration in total): marginal
  iterations per second. On 2 ranks each rank transports and moves half of the particles; weights, ESS, resampling
  and the flows' gradients are combined over ranks every transition.
* SMC sampling (``latflow sample``, 2D U(1) 8x8, ``n_particles`` per run): marginal runs per second with
  ``sampler.parallel = "runs"`` (every rank its own runs) and ``"particles"`` (every run spread over the ranks).

Scaling = throughput(2 ranks) / throughput(1 rank); ideal 2 on a 2-core machine. One torch thread per rank.

Usage::

    python benchmarks/annealing_ranks.py            # a few minutes
    python benchmarks/annealing_ranks.py --quick    # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

LATFLOW = [sys.executable, "-m", "latflow.jobs.cli"]

CRAFT_JOB = """
[theory]
name = "phi4"
m2 = -4.0
lam = 6.975
[lattice]
shape = [8, 8]
[model]
kind = "affine"
n_layers = 2
hidden = [8]
[train]
checkpoint_every = 100000
[sampler]
kind = "craft"
n_particles = {particles}
train_particles = {particles}
n_transitions = 5
step_size = 0.2
n_steps = 5
n_iterations = 10
lr = 0.001
[output]
path = "craft.h5"
model = "craft.pt"
[run]
seed = 3
"""

SMC_JOB = """
[theory]
name = "u1"
beta = 2.0
[lattice]
shape = [8, 8]
[sampler]
kind = "smc"
n_samples = 4
commit_every = 2
n_particles = {particles}
path = "coupling"
n_transitions = 10
step_size = 0.2
n_steps = 5
[output]
path = "smc.h5"
[run]
seed = 3
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(ranks: int, args: list[str], cwd: Path) -> float:
    """Wall seconds of ``latflow ARGS`` under ``ranks`` MPI ranks (1: no launcher)."""
    cmd = LATFLOW + args if ranks == 1 else [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *LATFLOW, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def craft_training(cwd: Path, ranks: int, short: int, long: int) -> float:
    """Marginal CRAFT iterations per second."""
    walls = []
    for n in (short, long):
        args = ["train", "craft.toml", "--force", "--set", f"sampler.n_iterations={n}"]
        walls.append(_run(ranks, [*args, "--set", f"output.model=c{ranks}_{n}.pt"], cwd))
    return (long - short) / (walls[1] - walls[0])


def smc_sampling(cwd: Path, ranks: int, parallel: str, short: int, long: int) -> float:
    """Marginal SMC runs per second (``commit_every`` = 2 runs per pass)."""
    out = []
    for n in (short, long):
        path = cwd / f"s{ranks}_{parallel}_{n}.h5"
        args = ["sample", "smc.toml", "--force", "--out", path.name, "--set", f"sampler.n_samples={n}"]
        wall = _run(ranks, [*args, "--set", f"sampler.parallel={parallel}"], cwd)
        with h5py.File(path, "r") as f:
            out.append((wall, int(f.attrs["n_runs_committed"])))
    (t0, r0), (t1, r1) = out
    return (r1 - r0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs: checks the script runs")
    args = ap.parse_args()
    if shutil.which("mpiexec") is None:
        raise SystemExit("mpiexec not on PATH (install the extra: pip install 'latflow[mpi]')")
    particles = 64 if args.quick else 512
    short, long = (2, 4) if args.quick else (10, 60)
    runs_short, runs_long = (4, 8) if args.quick else (8, 120)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "craft.toml").write_text(CRAFT_JOB.format(particles=particles))
        (cwd / "smc.toml").write_text(SMC_JOB.format(particles=particles))
        rates = {r: craft_training(cwd, r, short, long) for r in (1, 2)}
        rows.append((f"CRAFT training, phi^4 8x8, {particles} particles (iterations/s)", rates))
        print(f"# {rows[-1][0]}: {rates}, load {os.getloadavg()[0]:.2f}", flush=True)
        for parallel in ("runs", "particles"):
            rates = {r: smc_sampling(cwd, r, parallel, runs_short, runs_long) for r in (1, 2)}
            rows.append((f"SMC sampling, U(1) 8x8, {particles} particles, parallel = {parallel} (runs/s)", rates))
            print(f"# {rows[-1][0]}: {rates}, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"# load average after: {os.getloadavg()}")
    print()
    print(f"| {'measurement':<74} | 1 rank | 2 ranks | scaling |")
    print(f"|{'-' * 76}|--------|---------|---------|")
    for name, r in rows:
        print(f"| {name:<74} | {r[1]:6.2f} | {r[2]:7.2f} | {r[2] / r[1]:7.2f} |")


if __name__ == "__main__":
    main()
