"""Stopping a 2-rank run: SIGTERM or SIGUSR1 under ``mpiexec -n 2``.

A ``latflow train`` and a ``latflow sample`` (HMC) are stopped by a signal sent to each rank process by PID
(what a scheduler's ``scancel --signal`` or the walltime warning does; it does not depend on the launcher
passing signals on), exit 143, and ``--resume`` ends with the checkpoint or ensemble of an uninterrupted
2-rank run, bit for bit. MPICH's ``mpiexec`` (Hydra) also passes SIGTERM and SIGUSR1 on to the ranks:
signalling the launcher alone stops the run the same way (tested where the launcher is Hydra).

Skipped when ``mpiexec`` or mpi4py is missing, or where ``/proc`` does not list processes (rank PIDs).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import wait_for
from mpi_launch import NP, TIMEOUT, assert_same_ensembles, committed_rows
from mpi_launch import env as _env
from mpi_launch import rank_pids as _rank_pids

from latflow.jobs.cli import EXIT_TERMINATED

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the ranks' PIDs"),
]


PHI4 = """\
[theory]
name = "phi4"
m2 = -4.0
lam = 6.975

[lattice]
shape = [4, 4]
"""

TRAIN_STEPS, CHECKPOINT_EVERY = 200, 40
TRAIN_JOB = (
    PHI4
    + f"""
[model]
n_layers = 2
hidden = [4]

[train]
steps = {TRAIN_STEPS}
batch_size = 16
lr = 0.002
checkpoint_every = {CHECKPOINT_EVERY}
log_every = 1000

[output]
path = "flow.h5"
model = "model.pt"

[run]
seed = 31
"""
)

COMMIT_EVERY = 4
HMC_JOB = (
    PHI4
    + f"""
[sampler]
kind = "hmc"
n_samples = 1000000
thermalization = 2
n_chains = 3
step_size = 0.1
n_steps = 4
n_tune = 10
commit_every = {COMMIT_EVERY}
log_every = 1000000

[output]
path = "hmc.h5"

[run]
seed = 11
"""
)


# -- processes -------------------------------------------------------------------------------------------------


def _launch(args: list[str], cwd: Path, log: str) -> tuple[subprocess.Popen, Path]:
    """``mpiexec -n 2 latflow args...`` in the background; stdout and stderr go to ``cwd/log``."""
    path = cwd / log
    with open(path, "w") as out:
        proc = subprocess.Popen(
            [shutil.which("mpiexec"), "-n", str(NP), "latflow", *args],
            cwd=cwd,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, path


def _wait(proc: subprocess.Popen) -> int:
    """The launcher's exit status; kills it and fails the test after ``TIMEOUT`` s (a hung rank)."""
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args} did not end within {TIMEOUT} s")


def _run(args: list[str], cwd: Path, log: str) -> str:
    """``mpiexec -n 2 latflow args...`` to its end; fails the test unless it exits 0. Returns its output."""
    proc, path = _launch(args, cwd, log)
    rc = _wait(proc)
    out = path.read_text()
    assert rc == 0, f"latflow {' '.join(args)} exited {rc}:\n{out}"
    return out


def _stop(
    launcher: subprocess.Popen, log: Path, signum: int, ready: Callable[[], bool], what: str, *, every_rank: bool = True
) -> str:
    """Wait for ``ready()`` (``what``), send ``signum`` to every rank by PID (or to one, the last found); returns
    the output. The launcher must exit 143."""
    pids = wait_for(lambda: (p := _rank_pids(launcher)) and len(p) == NP and p, 60, "both ranks to start")
    wait_for(lambda: ready() or launcher.poll() is not None, 120, what)
    assert launcher.poll() is None, f"the run ended before it could be stopped (make it longer):\n{log.read_text()}"
    for pid in pids if every_rank else pids[-1:]:
        os.kill(pid, signum)
    rc = _wait(launcher)
    out = log.read_text()
    assert rc == EXIT_TERMINATED, f"exit {rc} after {signal.Signals(signum).name}, not {EXIT_TERMINATED}:\n{out}"
    # each rank names the signal it got (a rank told by the others to stop: SIGTERM); the first to abort may end
    # the other before it prints
    name = signal.Signals(signum).name if every_rank else "SIG(TERM|USR1)"
    assert re.search(rf"latflow: terminated \({name}\); committed rows and checkpoints are kept", out), out
    return out


# -- training --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "every_rank", "comm"),
    [
        (signal.SIGTERM, True, "mpi"),
        pytest.param(signal.SIGUSR1, False, "torch", marks=pytest.mark.slow),  # the default run has one of the two
    ],
    ids=["sigterm-both-ranks-mpi", "sigusr1-one-rank-torch"],
)
def test_two_rank_training_stopped_resumes_bit_for_bit(
    tmp_path: Path, signum: int, every_rank: bool, comm: str
) -> None:
    """A stop signal to both ranks, or to one of them, between periodic checkpoints: every rank stops at the same
    step, rank 0 writes the checkpoint of that step (both ranks' streams), and ``--resume`` ends with the
    weights, optimiser, history and streams of an uninterrupted 2-rank run (``run.comm`` = ``mpi`` and
    ``torch``: the same checkpoint)."""
    (tmp_path / "job.toml").write_text(TRAIN_JOB + f'comm = "{comm}"\n')
    model = tmp_path / "model.pt"
    proc, log = _launch(["train", "job.toml"], tmp_path, "stopped.log")
    out = _stop(proc, log, signum, model.exists, "the first periodic checkpoint", every_rank=every_rank)
    state = torch.load(model, weights_only=True)
    assert state["complete"] is False and CHECKPOINT_EVERY < state["step"] < TRAIN_STEPS, state["step"]
    assert len(state["history"]["loss"]) == state["step"] and len(state["generators"]) == NP
    m = re.search(rf"stopped by {signal.Signals(signum).name}: checkpoint \S*model\.pt written at step (\d+)", out)
    assert m and int(m.group(1)) == state["step"], out  # every rank names the signal any rank got

    out = _run(["train", "job.toml", "--resume"], tmp_path, "resumed.log")
    assert f"resuming training from model.pt at step {state['step']}" in out, out
    resumed = torch.load(model, weights_only=True)
    _run(["train", "job.toml", "--set", "output.model=ref.pt"], tmp_path, "ref.log")
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert resumed["complete"] is True and resumed["step"] == ref["step"] == TRAIN_STEPS
    assert resumed["model"].keys() == ref["model"].keys()
    for k, v in ref["model"].items():
        assert v.numpy().tobytes() == resumed["model"][k].numpy().tobytes(), k
    assert resumed["history"] == ref["history"]
    for a, b in zip(resumed["generators"], ref["generators"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(resumed["optimizer"]["state"].values(), ref["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


# -- sampling --------------------------------------------------------------------------------------------------


def _n_committed(path: Path) -> int:
    """Rows committed so far, read while rank 0 may be writing (0 if unreadable yet)."""
    from latflow.ensemble import EnsembleReader

    try:
        with EnsembleReader(path) as r:
            return r.n_committed
    except Exception:  # noqa: BLE001 - not created yet, or caught mid-flush: try again
        return 0


def _stop_and_resume_sampling(tmp_path: Path, signum: int, send: str) -> None:
    (tmp_path / "job.toml").write_text(HMC_JOB)
    ens = tmp_path / "hmc.h5"
    rows_per_step = NP * 3  # chains per rank
    proc, log = _launch(["sample", "job.toml"], tmp_path, "stopped.log")
    if send == "ranks":
        _stop(proc, log, signum, lambda: _n_committed(ens) >= 3 * COMMIT_EVERY * rows_per_step, "three commits")
    else:  # the launcher passes the signal on
        wait_for(lambda: _n_committed(ens) >= 3 * COMMIT_EVERY * rows_per_step or proc.poll() is not None, 180, "")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signum)
        rc = _wait(proc)
        out = log.read_text()
        assert rc == EXIT_TERMINATED, f"exit {rc}, not {EXIT_TERMINATED}:\n{out}"
        assert f"latflow: terminated ({signal.Signals(signum).name})" in out, out
    verify = subprocess.run(["latflow", "verify", "hmc.h5"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("INCOMPLETE hmc.h5"), verify.stdout + verify.stderr
    committed = _n_committed(ens)
    assert committed % (COMMIT_EVERY * rows_per_step) == 0, committed  # whole blocks of both ranks
    steps = committed // rows_per_step + 5 * COMMIT_EVERY  # continue 5 more blocks

    out = _run(["sample", "job.toml", "--resume", "--set", f"sampler.n_samples={steps}"], tmp_path, "resumed.log")
    assert f"resuming hmc.h5 at {committed} committed rows" in out, out
    _run(["sample", "job.toml", "--out", "ref.h5", "--set", f"sampler.n_samples={steps}"], tmp_path, "ref.log")
    assert len(committed_rows(tmp_path / "ref.h5")["markov/chain"]) == steps * rows_per_step
    assert_same_ensembles(ens, tmp_path / "ref.h5", "phi")


def test_two_rank_hmc_stopped_by_sigusr1_resumes_bit_for_bit(tmp_path: Path) -> None:
    """SIGUSR1 (the walltime warning) to both ranks: exit 143, the file holds whole blocks of both ranks, and
    ``--resume`` continues to the ensemble of an uninterrupted 2-rank run."""
    _stop_and_resume_sampling(tmp_path, signal.SIGUSR1, "ranks")


def _launcher_is_hydra() -> bool:
    try:
        out = subprocess.run([shutil.which("mpiexec"), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "HYDRA" in out.stdout


@pytest.mark.skipif(not _launcher_is_hydra(), reason="signal forwarding checked for MPICH's mpiexec (Hydra) only")
@pytest.mark.slow  # the default run signals the ranks; this checks the launcher passes the signal on
def test_sigterm_to_mpich_launcher_reaches_the_ranks(tmp_path: Path) -> None:
    """SIGTERM to ``mpiexec`` alone: Hydra passes it on, the ranks stop cleanly, the run resumes bit for bit."""
    _stop_and_resume_sampling(tmp_path, signal.SIGTERM, "launcher")
