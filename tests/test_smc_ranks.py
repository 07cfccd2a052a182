"""SMC and CRAFT across MPI ranks: one population spread over ranks, data-parallel CRAFT training, stop signals.

Real ``mpiexec -n 2`` runs, no mocks:

* ``tests/mpi_scripts/spread_smc.py``: without Markov moves a population spread over two ranks is the serial
  algorithm particle for particle (weights, resampling, adaptive schedule, ``log Z``), data-parallel CRAFT
  training gives the serial run's flows, and spread SMC with HMC moves estimates ``log Z`` and ``<x>`` of a
  Gaussian within its errors;
* ``sampler.parallel = "particles"`` through ``latflow sample``: one run per pass with its particles in order,
  resumed bit for bit;
* CRAFT training on two ranks stopped by SIGTERM resumes to the uninterrupted run's flows, byte for byte;
  single-process CRAFT and SNF training do the same after SIGUSR1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import stat_seed, wait_for
from mpi_launch import NP, TIMEOUT, mpirun, rank_pids
from mpi_launch import env as _env

from latflow import checkpoint
from latflow.jobs.cli import EXIT_TERMINATED


def mpi(test):
    """Mark a test as an ``mpiexec`` test, skipped without mpiexec or mpi4py."""
    for mark in (
        pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
        pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH"),
        pytest.mark.mpi,
    ):
        test = mark(test)
    return test


SCRIPT = Path(__file__).parent / "mpi_scripts" / "spread_smc.py"
Z_BOUND = 3.0


def z_log_z(log_z: np.ndarray, exact: float) -> float:
    """z-score of independent ``log Z`` estimates, their ``var / 2`` bias removed (as in test_annealing)."""
    p, var = len(log_z), float(np.var(log_z, ddof=1))
    return (float(np.mean(log_z)) + 0.5 * var - exact) / math.sqrt(var / p + 0.5 * var**2 / (p - 1))


@pytest.mark.statistical
@mpi
def test_spread_population_is_the_serial_algorithm_and_exact(tmp_path: Path, record_z) -> None:
    """The script's exact checks pass on every rank; spread SMC with HMC moves: log Z and <x> within errors."""
    out = tmp_path / "spread.json"
    proc = mpirun(sys.executable, str(SCRIPT), str(stat_seed(7101)), str(out), cwd=tmp_path)
    assert proc.stdout.count("SPREAD_SMC_OK") == NP, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["n_resampled"] > 0, "the statistical part should resample"
    z = z_log_z(np.array(r["log_z"]), r["exact_log_z"])
    record_z("log Z", z, Z_BOUND)
    assert abs(z) < Z_BOUND, f"log Z: z = {z:.2f}"
    x = np.array(r["mean_x"])
    z = (float(x.mean()) - r["exact_x"]) / (float(x.std(ddof=1)) / math.sqrt(len(x)))
    record_z("<x>", z, Z_BOUND)
    assert abs(z) < Z_BOUND, f"<x>: z = {z:.2f}"


SPREAD_SMC_JOB = """
[theory]
name = "u1"
beta = 1.0
[lattice]
shape = [4, 4]
[sampler]
kind = "smc"
parallel = "particles"
n_samples = 6
commit_every = 2
n_particles = 15
path = "coupling"
n_transitions = 5
resample_threshold = 0.9
step_size = 0.3
n_steps = 3
[output]
path = "smc.h5"
[run]
seed = 5
"""


@mpi
def test_particles_spread_job_writes_whole_runs_and_resumes(tmp_path: Path) -> None:
    """``parallel = "particles"``: every pass writes whole runs (15 particles from 2 ranks, in order, global
    per-run values); ``--resume`` continues bit for bit; the ensemble verifies."""
    (tmp_path / "job.toml").write_text(SPREAD_SMC_JOB)
    mpirun("latflow", "sample", "job.toml", "--set", "sampler.n_samples=2", cwd=tmp_path)
    mpirun("latflow", "sample", "job.toml", "--resume", cwd=tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "job.toml").write_text(SPREAD_SMC_JOB)
    mpirun("latflow", "sample", "job.toml", cwd=tmp_path / "b")
    with h5py.File(tmp_path / "smc.h5", "r") as fa, h5py.File(tmp_path / "b" / "smc.h5", "r") as fb:
        np.testing.assert_array_equal(fa["annealing/chain"][:], np.arange(6))
        np.testing.assert_array_equal(fa["annealing/n_particles"][:], np.full(6, 15))
        np.testing.assert_array_equal(fa["markov/chain"][:], np.repeat(np.arange(6), 15))
        np.testing.assert_array_equal(fa["markov/step"][:], np.tile(np.arange(15), 6))
        assert json.loads(fa.attrs["sampler"])["parallel"] == "particles"
        for key in ("fields/links", "annealing/log_z", "annealing/ess", "weights/log_w"):
            np.testing.assert_array_equal(fa[key][:], fb[key][:], err_msg=key)
        # each run's weights are normalised over the whole population, not per rank
        w = np.exp(fa["weights/log_w"][:].reshape(6, 15))
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-12)
        assert int(fa["annealing/n_resample"][:].sum()) > 0, "the check should resample"
    r = subprocess.run([sys.executable, "-m", "latflow.jobs.cli", "verify", "smc.h5"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


CRAFT_JOB = """
[theory]
name = "phi4"
m2 = -1.0
lam = 1.0
[lattice]
shape = [4, 4]
[model]
kind = "affine"
n_layers = 2
hidden = [4]
[train]
checkpoint_every = {every}
[sampler]
kind = "craft"
n_samples = 2
commit_every = 2
n_particles = 16
n_transitions = 3
step_size = 0.3
n_steps = 2
n_iterations = {iterations}
train_particles = 16
lr = 0.01
[output]
path = "craft.h5"
model = "flows.pt"
[run]
seed = 11
"""


def _same_flows(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert v.numpy().tobytes() == b["model"][k].numpy().tobytes(), k
    assert a["history"] == b["history"]


@pytest.mark.slow  # the default run has the one-process stop tests and the 2-rank CRAFT exactness script
@mpi
def test_craft_training_on_two_ranks_stops_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Data-parallel CRAFT training stopped by SIGTERM on its ranks: exit 143, a checkpoint at the iteration
    reached with both ranks' streams; ``--resume`` on two ranks ends with the uninterrupted run's flows."""
    iterations = 100
    job = CRAFT_JOB.format(every=10, iterations=iterations)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "job.toml").write_text(job)
    mpirun("latflow", "train", "job.toml", cwd=ref)

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.toml").write_text(job)
    proc = subprocess.Popen([shutil.which("mpiexec"), "-n", str(NP), "latflow", "train", "job.toml"], cwd=run,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: (run / "flows.pt").exists() or proc.poll() is not None, TIMEOUT, "the first checkpoint")
        pids = wait_for(lambda: (p := rank_pids(proc)) and len(p) == NP and p, 60, "both ranks")
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TERMINATED, f"exit {proc.returncode} (make the training longer?)\n{err}"
    state = checkpoint.load(run / "flows.pt")
    m = re.search(r"stopped by SIGTERM: checkpoint \S*flows\.pt written at iteration (\d+)", err)
    assert m and int(m.group(1)) == state["step"], err
    assert state["complete"] is False and 0 < state["step"] < iterations
    assert len(state["generators"]) == NP and state["shared_generator"] is not None

    mpirun("latflow", "train", "job.toml", "--resume", cwd=run)
    _same_flows(checkpoint.load(ref / "flows.pt"), checkpoint.load(run / "flows.pt"))


@pytest.mark.parametrize("kind", ["craft", "snf"])
def test_annealing_training_stopped_by_sigusr1_resumes_bit_for_bit(kind, latflow_cli, tmp_path: Path) -> None:
    """One process: CRAFT iterations and SNF steps stop after SIGUSR1 with a checkpoint of the step reached,
    and ``--resume`` ends where an uninterrupted run ends, byte for byte."""
    iterations = 120
    job = CRAFT_JOB.format(every=10, iterations=iterations)
    if kind == "snf":
        job = job.replace('kind = "craft"', 'kind = "snf"').replace("train_particles = 16\nlr = 0.01\n", "")
        job = job.replace("[train]\n", f"[train]\nsteps = {iterations}\nbatch_size = 16\nlr = 0.01\n")
        job = job.replace(f"n_iterations = {iterations}\n", 'kernel = "rwm"\n')
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        d.mkdir()
        (d / "job.toml").write_text(job)
    r = latflow_cli.run(["train", "job.toml"], ref)
    assert r.returncode == 0, str(r)
    proc = latflow_cli.spawn(["train", "job.toml"], run)
    wait_for(lambda: (run / "flows.pt").exists() or not proc.running(), 120, "the first checkpoint")
    proc.kill(signal.SIGUSR1)
    r = proc.wait(120)
    assert r.returncode == EXIT_TERMINATED, f"training ended before it was stopped (make it longer):\n{r}"
    unit = "iteration" if kind == "craft" else "step"
    m = re.search(rf"stopped by SIGUSR1: checkpoint \S*flows\.pt written at {unit} (\d+)", r.stderr)
    state = checkpoint.load(run / "flows.pt")
    assert m and int(m.group(1)) == state["step"] and state["complete"] is False, r.stderr
    r = latflow_cli.run(["train", "job.toml", "--resume"], run)
    assert r.returncode == 0, str(r)
    _same_flows(checkpoint.load(ref / "flows.pt"), checkpoint.load(run / "flows.pt"))


def test_parallel_particles_is_refused_where_it_does_not_apply(latflow_cli, tmp_path: Path) -> None:
    """``parallel = "particles"`` for aft/pimh, or an unknown value: one line naming the key and the values."""
    (tmp_path / "job.toml").write_text(SPREAD_SMC_JOB)
    for sets, expected in (
        (["sampler.kind=aft"], "'sampler.parallel' = 'particles': must be 'runs' (spreading particles over ranks"),
        (["sampler.parallel=lots"], "'sampler.parallel' = 'lots': expected one of 'runs', 'particles'"),
    ):
        argv = ["sample", "job.toml"]
        for s in sets:
            argv += ["--set", s]
        r = latflow_cli.run(argv, tmp_path)
        assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, str(r)
        assert not (tmp_path / "smc.h5").exists()
