"""Walltime safety: SIGUSR1 and SIGTERM stop a run cleanly (exit 143), training writes a checkpoint at the step
it reached, a Slurm job requeues itself after the walltime warning and its requeued run continues bit for bit,
and MPI launchers are recognised from their environment variables.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import h5py
import pytest
from conftest import wait_for as _wait_for
from conftest_slurm import (
    slurm_cluster,  # noqa: F401  (the session fixture)
    slurm_fixture,  # noqa: F401  (the fixture "slurm")
)

from latflow import checkpoint
from latflow.jobs import termination
from latflow.jobs.cli import EXIT_TERMINATED, main, make_parser
from latflow.mpi import launched_by_mpi

LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDRA_", "SLURM_")


# -- launcher detection ----------------------------------------------------------------------------------------


@pytest.fixture
def no_launcher(monkeypatch):
    import os

    for var in list(os.environ):
        if var.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(var)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),  # Open MPI mpirun
        ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
        ({"PMI_SIZE": "2"}, True),  # MPICH/Hydra mpiexec, Intel MPI, srun --mpi=pmi2
        ({"PMIX_SIZE": "2"}, True),  # srun --mpi=pmix
        ({"MPI_LOCALNRANKS": "3"}, True),  # Hydra's node-local count
        ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}, True),  # srun -n 2
        ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "2"}, False),  # one-task step of a 2-task job
        ({"SLURM_NTASKS": "8"}, False),  # a batch script before any srun: not a launcher
        ({"PMI_SIZE": "x", "SLURM_STEP_NUM_TASKS": "2"}, True),  # a malformed variable does not hide the next
    ],
)
def test_launcher_detection(no_launcher, env, expected):
    for var, value in env.items():
        no_launcher.setenv(var, value)
    assert launched_by_mpi() is expected


# -- signals ---------------------------------------------------------------------------------------------------


def test_stop_signals_and_exit_status_are_documented():
    assert termination.SIGNALS == (signal.SIGTERM, signal.SIGUSR1)
    assert termination.Terminated(signal.SIGUSR1).signal_name == "SIGUSR1"
    assert termination.Terminated(signal.SIGTERM).signal_name == "SIGTERM"
    assert EXIT_TERMINATED == 143
    assert "143 stopped by SIGTERM or SIGUSR1" in " ".join(make_parser().epilog.split())
    assert "SIGUSR1" in main.__doc__


def test_deferred_records_and_stops_where_the_owner_says():
    previous = termination.install()
    try:
        with termination.deferred():
            signal.raise_signal(signal.SIGUSR1)
            termination.check()  # inside the block: no exception
            assert termination.pending() == signal.SIGUSR1
        with pytest.raises(termination.Terminated) as info:
            termination.check()
        assert info.value.signal_name == "SIGUSR1"
    finally:
        termination.clear()
        termination.restore(previous)


def test_sigusr1_stops_sampling_cleanly(latflow_cli, make_job, tmp_path):
    make_job(tmp_path, "hmc", {"sampler.n_samples": 4000, "sampler.commit_every": 4, "sampler.log_every": 4})
    proc = latflow_cli.spawn(["sample", "job.toml"], tmp_path)
    _wait_for(lambda: "sample 4/" in proc.stderr_so_far() or not proc.running(), 120, "the first progress line")
    proc.kill(signal.SIGUSR1)
    r = proc.wait(120)
    assert r.returncode == EXIT_TERMINATED, str(r)
    assert "latflow: terminated (SIGUSR1); committed rows and checkpoints are kept" in r.stderr, r.stderr
    r = latflow_cli.run(["verify", "hmc.h5"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("INCOMPLETE hmc.h5"), str(r)


def test_training_stopped_by_sigterm_checkpoints_the_step_reached(latflow_cli, make_job, tmp_path):
    """SIGTERM between periodic checkpoints: the checkpoint holds the step reached (past the last periodic
    one), and --resume ends with the weights and loss history of an uninterrupted run, byte for byte."""
    steps, every = 400, 100
    make_job(
        tmp_path,
        "flow",
        {"output.model": "model.pt", "train.steps": steps, "train.checkpoint_every": every, "train.log_every": 1000},
    )
    model = tmp_path / "model.pt"
    proc = latflow_cli.spawn(["train", "job.toml"], tmp_path)
    _wait_for(lambda: model.exists() or not proc.running(), 120, "the first periodic checkpoint")
    proc.kill(signal.SIGTERM)
    r = proc.wait(120)
    assert r.returncode == EXIT_TERMINATED, f"training ended before it was stopped (make it longer):\n{r}"
    assert "latflow: terminated (SIGTERM)" in r.stderr, r.stderr
    state = checkpoint.load(model)
    m = re.search(r"stopped by SIGTERM: checkpoint \S*model\.pt written at step (\d+)", r.stderr)
    assert m and int(m.group(1)) == state["step"], r.stderr
    assert state["complete"] is False and every < state["step"] < steps, state["step"]
    assert len(state["history"]["loss"]) == state["step"]

    r = latflow_cli.run(["train", "job.toml", "--resume"], tmp_path)
    assert r.returncode == 0, str(r)
    assert f"resuming training from model.pt at step {m.group(1)}" in r.stderr, r.stderr
    state = checkpoint.load(model)
    assert state["complete"] is True and state["step"] == steps

    r = latflow_cli.run(["train", "job.toml", "--set", "output.model=ref.pt"], tmp_path)
    assert r.returncode == 0, str(r)
    ref = checkpoint.load(tmp_path / "ref.pt")
    assert ref["model"].keys() == state["model"].keys()
    for k, v in ref["model"].items():
        assert v.numpy().tobytes() == state["model"][k].numpy().tobytes(), k
    assert ref["history"] == state["history"]


# -- Slurm: the walltime warning requeues the job, the requeued run resumes ------------------------------------

VENV_BIN = str(Path(sys.executable).parent)
SETUP = f"export PATH={VENV_BIN}:$PATH"


def _n_committed(path: Path) -> int:
    """Rows committed so far, read while the writer may be running (0 if unreadable yet)."""
    from latflow.ensemble import EnsembleReader

    try:
        with EnsembleReader(path) as r:
            return r.n_committed
    except Exception:  # not created yet, or caught mid-flush: try again
        return 0


def _job_field(cluster, job_id: str, key: str) -> str:
    out = cluster.run("scontrol", "-o", "show", "job", job_id).stdout
    m = re.search(rf"\b{key}=(\S*)", out)
    return m.group(1) if m else ""


def test_slurm_walltime_warning_requeues_and_resumes_bit_for_bit(slurm, make_job, latflow_cli, capsys):
    n_traj, n_chains = 1500, 4
    make_job(
        Path("."),
        "hmc",
        {
            "resources": {"walltime": "00:05:00", "setup": [SETUP]},
            "sampler.n_samples": n_traj,
            "sampler.commit_every": 10,
            "sampler.log_every": 100,
        },
    )
    assert main(["submit", "job.toml", "--scheduler", "slurm", "--stages", "sample"]) == 0
    job_id = json.loads(Path("hmc.jobs.json").read_text())["jobs"][0]["id"]
    ens = Path("hmc.h5")
    _wait_for(lambda: _n_committed(ens) >= 200 or not slurm.queue(), 120, "committed rows", 0.1)
    assert slurm.queue(), "the job ended before the warning (make it longer)"
    # what --signal=B:USR1@N does before the walltime: SIGUSR1 to the batch shell only
    r = slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    assert r.returncode == 0, r.stderr
    _wait_for(lambda: _job_field(slurm, job_id, "Restarts") == "1" or not slurm.queue(), 60, "the requeue", 0.2)
    assert _job_field(slurm, job_id, "Restarts") == "1", slurm.run("scontrol", "show", "job", job_id).stdout
    # Slurm holds a requeued batch job back until its credential expires (cred_expire + 1 = 121 s by default);
    # the test waits 3 s only: slurmd refuses a credential of the same job made within the second it revoked one
    _wait_for(lambda: _job_field(slurm, job_id, "JobState") == "PENDING", 30, "the requeued job pending", 0.2)
    r = slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")
    assert r.returncode == 0, r.stderr
    try:
        _wait_for(lambda: not slurm.queue(), 120, "the requeued job to finish", 0.5)
    except AssertionError:
        show = slurm.run("scontrol", "show", "job", job_id).stdout
        logs = "".join(p.read_text() for p in Path.cwd().glob("hmc.sample.*.out"))
        raise AssertionError(f"{show}\n{logs}") from None
    log = Path(f"hmc.sample.{job_id}.out").read_text()  # both runs' (--open-mode=append)
    show = slurm.run("scontrol", "show", "job", job_id).stdout
    assert _job_field(slurm, job_id, "JobState") == "COMPLETED", f"{show}\n{log}"
    assert re.search(r"resuming hmc\.h5 at \d+ committed rows", log), log
    assert "latflow: requeueing job" in log and "terminated (SIGTERM)" in log, log  # the first run's end is kept

    # a reference run, never interrupted, of the same job
    r = latflow_cli.run(["sample", "job.toml", "--out", "ref.h5"], Path.cwd())
    assert r.returncode == 0, str(r)
    with h5py.File(ens, "r") as a, h5py.File("ref.h5", "r") as b:
        for group in ("fields", "observables", "markov", "weights"):
            assert sorted(a[group]) == sorted(b[group]), group
            for name in b[group]:
                x, y = a[f"{group}/{name}"][()], b[f"{group}/{name}"][()]
                assert x.dtype == y.dtype and x.shape == y.shape, f"{group}/{name}"
                assert x.tobytes() == y.tobytes(), f"{group}/{name}"
    capsys.readouterr()
    assert main(["verify", "hmc.h5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK hmc.h5: {n_traj} of {n_traj} steps per chain committed ({n_chains} chains)"), out
