"""Throughput of ``latflow`` with 1 and 2 MPI ranks (``mpiexec -n 2``): sampling and training.

Each measurement runs the real command line twice per rank count, a short and a long run of the same job, and
takes the difference, so that start-up (imports, model loading, file creation) cancels:

    marginal throughput = (work(long) - work(short)) / (time(long) - time(short)),

with work = rows written for sampling (every rank runs its own chains, all into one ensemble) and flow samples
drawn for training (every rank draws ``train.batch_size`` per step; gradients are averaged over ranks).
Scaling = throughput(2 ranks) / throughput(1 rank); ideal 2 on a 2-core machine. One torch thread per rank.

Usage::

    python benchmarks/mpi_scaling.py            # phi^4 HMC and flow-MCMC sampling, affine-flow training
    python benchmarks/mpi_scaling.py --quick    # seconds; checks the script runs
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

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "jobs" / "examples"
LATFLOW = [sys.executable, "-m", "latflow.jobs.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(ranks: int, args: list[str], cwd: Path) -> float:
    """Wall seconds of ``latflow ARGS`` under ``ranks`` MPI ranks (1: no launcher)."""
    cmd = LATFLOW + args if ranks == 1 else [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *LATFLOW, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def _rows(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f.attrs["n_committed"])


def sampling(job: Path, sets: list[str], short: int, long: int, cwd: Path, ranks: int) -> tuple[float, int]:
    """Marginal rows per second of ``latflow sample`` with ``ranks`` ranks; returns (rows/s, rows of the long run)."""
    out = []
    for n in (short, long):
        path = cwd / f"s{ranks}_{n}.h5"
        args = ["sample", str(job), "--force", "--out", path.name, "--set", f"sampler.n_samples={n}"]
        for s in sets:
            args += ["--set", s]
        wall = _run(ranks, args, cwd)
        out.append((wall, _rows(path)))
    (t0, r0), (t1, r1) = out
    return (r1 - r0) / (t1 - t0), r1


def training(job: Path, sets: list[str], short: int, long: int, batch: int, cwd: Path, ranks: int) -> float:
    """Marginal flow samples per second of ``latflow train`` (``batch`` per rank and step)."""
    walls = []
    for n in (short, long):
        args = ["train", str(job), "--force", "--set", f"train.steps={n}", "--set", f"output.model=t{ranks}_{n}.pt"]
        for s in sets:
            args += ["--set", s]
        walls.append(_run(ranks, args, cwd))
    return (long - short) * batch * ranks / (walls[1] - walls[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs: checks the script runs")
    args = ap.parse_args()
    if shutil.which("mpiexec") is None:
        raise SystemExit("mpiexec not on PATH (install the extra: pip install 'latflow[mpi]')")
    scale = 0.1 if args.quick else 1.0
    print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"# load average before: {os.getloadavg()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        hmc_sets = [
            "lattice.shape=[16,16]",
            "theory.lam=6.0",
            "sampler.n_chains=16",
            "sampler.tune=false",
            "sampler.thermalization=0",
            "sampler.commit_every=100",
            "sampler.log_every=100000",
        ]
        short, long = 50, int(100 + 900 * scale)
        for ranks in (1, 2):
            rate, rows = sampling(EXAMPLES / "phi4_hmc.toml", hmc_sets, short, long, cwd, ranks)
            results.append(("HMC sampling, phi^4 16x16, 16 chains per rank (rows/s)", ranks, rate, rows))

        # flow-MCMC: train a model once (1 rank), then sample with it
        flow_sets = ["train.log_every=100000", "train.checkpoint_every=100000", "output.model=flow.pt"]
        _run(
            1,
            ["train", str(EXAMPLES / "phi4_default.toml"), "--force", "--set", "train.steps=50", *_flat(flow_sets)],
            cwd,
        )
        sample_sets = [*flow_sets, "sampler.thermalization=0", "sampler.batch_size=1000", "sampler.commit_every=5000"]
        short, long = 2000, int(4000 + 36000 * scale)
        for ranks in (1, 2):
            rate, rows = sampling(EXAMPLES / "phi4_default.toml", sample_sets, short, long, cwd, ranks)
            results.append(("flow-MCMC sampling, phi^4 6x6 affine flow (rows/s)", ranks, rate, rows))

        train_sets = ["train.log_every=100000", "train.checkpoint_every=100000", "train.batch_size=64"]
        short, long = 20, int(40 + 260 * scale)
        for ranks in (1, 2):
            rate = training(EXAMPLES / "phi4_default.toml", train_sets, short, long, 64, cwd, ranks)
            results.append(("training, phi^4 6x6 affine flow, batch 64 per rank (samples/s)", ranks, rate, 0))
    print(f"# load average after: {os.getloadavg()}")
    print()
    print(f"| {'measurement':<66} | 1 rank | 2 ranks | scaling |")
    print(f"|{'-' * 68}|--------|---------|---------|")
    for i in range(0, len(results), 2):
        name, _, r1, _ = results[i]
        _, _, r2, _ = results[i + 1]
        print(f"| {name:<66} | {r1:6.0f} | {r2:7.0f} | {r2 / r1:7.2f} |")


def _flat(sets: list[str]) -> list[str]:
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    return out


if __name__ == "__main__":
    main()
