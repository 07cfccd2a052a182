"""Throughput of ``latflow`` with 1 and 2 MPI ranks (``mpiexec -n 2``): sampling and training.

Each measurement runs the real command line twice per rank count, a short and a long run of the same job, and
takes the difference, so that start-up (imports, model loading, file creation) cancels:

    marginal throughput = (work(long) - work(short)) / (time(long) - time(short)),

with work = rows written for sampling (every rank runs its own chains, all into one ensemble) and flow samples
drawn for training (every rank draws ``train.batch_size`` per step; gradients are averaged over ranks).
Scaling = throughput(2 ranks) / throughput(1 rank); ideal 2 on a 2-core machine. One torch thread per rank.

With ``--repeats N`` every measurement is taken N times, alternating 1 and 2 ranks so that both see the same
background load, and the table gives the median throughput of each, and the median and range of the N ratios.

Usage::

    python benchmarks/mpi_scaling.py                          # phi^4 HMC and flow-MCMC sampling, affine-flow training
    python benchmarks/mpi_scaling.py --only hmc --repeats 3   # the HMC sampling row only, three times
    python benchmarks/mpi_scaling.py --quick                  # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
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


MEASUREMENTS = ("hmc", "flow", "train")


def _measure(which: str, cwd: Path, scale: float) -> tuple[str, dict[int, float]]:
    """One measurement (``which`` in :data:`MEASUREMENTS`) with 1 and 2 ranks: (name, {ranks: throughput})."""
    rates: dict[int, float] = {}
    if which == "hmc":
        hmc_sets = [
            "lattice.shape=[16,16]",
            "theory.lam=6.0",
            "sampler.n_chains=16",
            "sampler.tune=false",
            "sampler.thermalization=0",
            "sampler.commit_every=100",
            "sampler.log_every=100000",
        ]
        short, long = 50, int(100 + 2900 * scale)  # ~10 s of sampling per rank: start-up noise matters less
        for ranks in (1, 2):
            rates[ranks], _ = sampling(EXAMPLES / "phi4_hmc.toml", hmc_sets, short, long, cwd, ranks)
        return "HMC sampling, phi^4 16x16, 16 chains per rank (rows/s)", rates
    flow_sets = ["train.log_every=100000", "train.checkpoint_every=100000", "output.model=flow.pt"]
    if which == "flow":
        # flow-MCMC: train a model once (1 rank), then sample with it
        if not (cwd / "flow.pt").exists():
            args = ["train", str(EXAMPLES / "phi4_default.toml"), "--force", "--set", "train.steps=50"]
            _run(1, [*args, *_flat(flow_sets)], cwd)
        sample_sets = [*flow_sets, "sampler.thermalization=0", "sampler.batch_size=1000", "sampler.commit_every=5000"]
        short, long = 2000, int(4000 + 36000 * scale)
        for ranks in (1, 2):
            rates[ranks], _ = sampling(EXAMPLES / "phi4_default.toml", sample_sets, short, long, cwd, ranks)
        return "flow-MCMC sampling, phi^4 6x6 affine flow (rows/s)", rates
    train_sets = ["train.log_every=100000", "train.checkpoint_every=100000", "train.batch_size=64"]
    short, long = 20, int(40 + 260 * scale)
    for ranks in (1, 2):
        rates[ranks] = training(EXAMPLES / "phi4_default.toml", train_sets, short, long, 64, cwd, ranks)
    return "training, phi^4 6x6 affine flow, batch 64 per rank (samples/s)", rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs: checks the script runs")
    ap.add_argument("--only", action="append", choices=MEASUREMENTS, help="measure only this (repeatable)")
    ap.add_argument("--repeats", type=int, default=1, help="repeat every measurement N times (median, range)")
    args = ap.parse_args()
    if shutil.which("mpiexec") is None:
        raise SystemExit("mpiexec not on PATH (install the extra: pip install 'latflow[mpi]')")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: must be at least 1")
    scale = 0.1 if args.quick else 1.0
    print(f"# {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: {os.getloadavg()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for which in args.only or MEASUREMENTS:
            runs = []
            for i in range(args.repeats):
                name, rates = _measure(which, cwd, scale)
                runs.append(rates)
                print(
                    f"# {name}, repeat {i + 1}: 1 rank {rates[1]:.0f}, 2 ranks {rates[2]:.0f}, "
                    f"scaling {rates[2] / rates[1]:.2f}, load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            results.append((name, runs))
    print(f"# load average after: {os.getloadavg()}")
    print()
    print(f"| {'measurement':<66} | 1 rank | 2 ranks | scaling |")
    print(f"|{'-' * 68}|--------|---------|---------|")
    for name, runs in results:
        r1 = statistics.median(r[1] for r in runs)
        r2 = statistics.median(r[2] for r in runs)
        ratios = [r[2] / r[1] for r in runs]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(runs) > 1 else ""
        print(f"| {name:<66} | {r1:6.0f} | {r2:7.0f} | {statistics.median(ratios):7.2f}{spread} |")


def _flat(sets: list[str]) -> list[str]:
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    return out


if __name__ == "__main__":
    main()
