"""Crash safety and --resume, end to end: SIGKILL `latflow sample` / `latflow train` mid-run.

For each sampler an uninterrupted reference run is made first. A second run with the same seed is
killed (SIGKILL, no chance to clean up) once its file holds some committed rows, checked (the file
opens, `latflow verify` passes, every committed row equals the reference row), resumed, killed
again, and resumed to the end; the final ensemble must equal the reference bit for bit.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import wait_for

from latflow.ensemble import ROW_GROUPS, EnsembleReader


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.01):
    return wait_for(predicate, timeout, what, interval)


def _n_committed(path: Path) -> int:
    """Rows committed so far, read while the writer may be running (0 if unreadable yet)."""
    try:
        with EnsembleReader(path) as r:
            return r.n_committed
    except Exception:  # not created yet, or caught mid-flush: try again
        return 0


def _row_datasets(path: Path) -> dict[str, tuple]:
    """Stored dtype, full stored shape and sha256 attribute of every per-row dataset."""
    with h5py.File(path, "r") as f:
        return {
            f"{g}/{name}": (ds.dtype, ds.shape, ds.attrs.get("sha256")) for g in ROW_GROUPS for name, ds in f[g].items()
        }


def _assert_rows_equal(path: Path, ref: Path, n: int) -> None:
    """Rows [0, n) of every per-row dataset of `path` equal those of `ref`, bit for bit (fields/*: the
    configurations stored for those rows)."""
    with EnsembleReader(path) as a, EnsembleReader(ref) as b:
        names = [f"{g}/{x}" for g in ROW_GROUPS for x in b.names(g)]
        assert names == [f"{g}/{x}" for g in ROW_GROUPS for x in a.names(g)]
        assert {
            "fields/phi",
            "markov/chain",
            "markov/step",
            "markov/accepted",
            "weights/log_p",
            "weights/log_q",
            "weights/log_w",
        } <= set(names)
        assert any(x.startswith("observables/") for x in names)
        # configurations stored every save_every steps: those of the first n rows
        m = int(np.count_nonzero(b.read("fields/row") < n)) if "fields/row" in names else n
        for name in names:
            k = m if name.startswith("fields/") else n
            x, y = a.read(name, slice(0, k)), b.read(name, slice(0, k))
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), f"{name}: rows differ from the reference"


WRITER_OPEN = re.compile(r"latflow (sample \d+/\d+|resuming \S+ at \d+ committed rows)")


def _kill_when(proc, ens: Path, rows: int, total: int, delay: float = 0.0) -> int:
    """SIGKILL `proc` `delay` s after `ens` has `rows` committed rows; returns the committed count.

    The file is only polled once the writer has it open (it logs a progress line after each commit,
    or "resuming"): EnsembleReader opens with HDF5 file locking, and a reader holding its shared
    lock at the instant the writer opens the file makes the writer fail ("unable to lock file").
    While the writer holds the file, the reader falls back to opening without a lock.
    """
    _wait_for(
        lambda: WRITER_OPEN.search(proc.stderr_so_far()) or not proc.running(), 120, "the writer to open the file"
    )
    _wait_for(lambda: _n_committed(ens) >= rows or not proc.running(), 120, f"{rows} committed rows in {ens}")
    time.sleep(delay)  # 0: most likely while the next block is computed; > 0: anywhere, a commit included
    proc.kill(signal.SIGKILL)
    r = proc.wait(120)
    assert r.returncode == -signal.SIGKILL, f"the run ended before it was killed (make it longer):\n{r}"
    with EnsembleReader(ens) as e:  # the killed file opens
        n = e.n_committed
    assert rows <= n < total
    return n


def _crash_resume_and_compare(cli, d: Path, job: str, ref: Path, total: int, step: int) -> None:
    out = d / "crash.h5"
    args = ["sample", job, "--out", out.name]
    assert not out.exists()
    # first crash: a fresh run
    n1 = _kill_when(cli.spawn(args, d), out, max(step, total // 10), total)
    r = cli.run(["verify", out.name], d)
    assert r.returncode == 0 and r.stdout.startswith("INCOMPLETE"), str(r)  # intact, not finished
    _assert_rows_equal(out, ref, n1)
    # second crash: a resumed run
    n2 = _kill_when(cli.spawn(args + ["--resume"], d), out, max(n1 + step, total // 2), total, delay=0.013)
    assert cli.run(["verify", out.name], d).returncode == 0
    _assert_rows_equal(out, ref, n2)
    # resume to the end
    r = cli.run(args + ["--resume"], d)
    assert r.returncode == 0, str(r)
    assert f"resuming crash.h5 at {n2} committed rows" in r.stderr, r.stderr
    # the log counts the steps of this run, and says how many the file holds now
    m = re.search(
        r"wrote crash\.h5: (\d+) steps x (\d+) chain\(s\) this run; (\d+) steps per chain in the file", r.stderr
    )
    assert m, r.stderr
    this_run, chains, in_file = map(int, m.groups())
    assert this_run * chains == total - n2 and in_file * chains == total, (m.group(0), n2, total)
    assert cli.run(["verify", out.name], d).returncode == 0
    with EnsembleReader(out) as a, EnsembleReader(ref) as b:
        assert a.n_committed == b.n_committed == total
    _assert_rows_equal(out, ref, total)
    # no leftover rows beyond n_committed, same checksums, same layout
    assert _row_datasets(out) == _row_datasets(ref)


def _reference(cli, d: Path, job: str) -> Path:
    r = cli.run(["sample", job, "--out", "ref.h5"], d)
    assert r.returncode == 0, str(r)
    return d / "ref.h5"


FLOW_ROWS = 2000


@pytest.fixture(scope="module")
def trained_flow(tmp_path_factory, latflow_cli, make_job) -> Path:
    """A folder with a flow job (2000 flow-MCMC steps, a commit every 20) and its trained model."""
    d = tmp_path_factory.mktemp("resume-flow")
    # output.model is fixed, so that --out other.h5 samples with the same model
    make_job(
        d,
        "flow",
        {
            "output.model": "model.pt",
            "sampler.n_samples": FLOW_ROWS,
            "sampler.commit_every": 20,
            "sampler.batch_size": 100,
            "sampler.log_every": 20,
        },
    )
    r = latflow_cli.run(["train", "job.toml"], d)
    assert r.returncode == 0, str(r)
    return d


def test_flow_sample_killed_and_resumed(latflow_cli, trained_flow):
    ref = _reference(latflow_cli, trained_flow, "job.toml")
    _crash_resume_and_compare(latflow_cli, trained_flow, "job.toml", ref, FLOW_ROWS, step=20)


@pytest.mark.parametrize(
    "storage",
    [{}, {"output.save_every": 3, "output.compression": "gzip"}],
    ids=["every-configuration", "every-3rd-gzip"],
)
def test_hmc_sample_killed_and_resumed(latflow_cli, make_job, tmp_path, storage):
    """With save_every = 3 the commits (4 steps) cut through the save pattern: resumed files still equal."""
    n_traj, n_chains = 200, 4
    total = n_traj * n_chains
    make_job(
        tmp_path,
        "hmc",
        {
            "sampler.n_samples": n_traj,
            "sampler.n_chains": n_chains,
            "sampler.commit_every": 4,
            "sampler.log_every": 4,
            **storage,
        },
        name="hmc.toml",
    )
    ref = _reference(latflow_cli, tmp_path, "hmc.toml")
    _crash_resume_and_compare(latflow_cli, tmp_path, "hmc.toml", ref, total, step=4 * n_chains)


def _signal_training_after_first_checkpoint(latflow_cli, make_job, tmp_path, sig, steps):
    """Start a flow training job checkpointing every 10 steps into model.pt, send `sig` once the
    first checkpoint exists, and return (the finished process's result, the checkpoint path)."""
    make_job(
        tmp_path,
        "flow",
        {"output.model": "model.pt", "train.steps": steps, "train.checkpoint_every": 10, "train.log_every": 1000},
    )
    model = tmp_path / "model.pt"
    proc = latflow_cli.spawn(["train", "job.toml"], tmp_path)
    _wait_for(lambda: model.exists() or not proc.running(), 120, "the first checkpoint")
    proc.kill(sig)
    return proc.wait(120), model


def test_training_killed_and_resumed(latflow_cli, make_job, tmp_path):
    from latflow import checkpoint

    steps = 300
    r, model = _signal_training_after_first_checkpoint(latflow_cli, make_job, tmp_path, signal.SIGKILL, steps)
    assert r.returncode == -signal.SIGKILL, f"training ended before it was killed (make it longer):\n{r}"
    state = checkpoint.load(model)
    assert state["complete"] is False and 10 <= state["step"] < steps

    r = latflow_cli.run(["train", "job.toml", "--resume"], tmp_path)
    assert r.returncode == 0, str(r)
    m = re.search(r"resuming training from model\.pt at step (\d+)", r.stderr)
    assert m and 10 <= int(m.group(1)) < steps, r.stderr
    state = checkpoint.load(model)
    assert state["complete"] is True and state["step"] == steps
    assert len(state["history"]["loss"]) == steps

    # the same as never interrupted: every weight bit for bit
    r = latflow_cli.run(["train", "job.toml", "--set", "output.model=ref.pt"], tmp_path)
    assert r.returncode == 0, str(r)
    ref = checkpoint.load(tmp_path / "ref.pt")
    assert ref["model"].keys() == state["model"].keys()
    for k, v in ref["model"].items():
        assert v.numpy().tobytes() == state["model"][k].numpy().tobytes(), k
    assert ref["history"]["loss"] == state["history"]["loss"]


def test_sigterm_keeps_the_committed_rows_and_says_how_to_resume(latflow_cli, make_job, tmp_path):
    """SIGTERM (what batch schedulers send): exit 143, one line naming --resume, an intact file that
    resumes to the same ensemble as an uninterrupted run."""
    n_traj, n_chains = 200, 4
    total = n_traj * n_chains
    make_job(
        tmp_path,
        "hmc",
        {"sampler.n_samples": n_traj, "sampler.n_chains": n_chains, "sampler.commit_every": 4, "sampler.log_every": 4},
        name="hmc.toml",
    )
    ref = _reference(latflow_cli, tmp_path, "hmc.toml")
    out = tmp_path / "term.h5"
    args = ["sample", "hmc.toml", "--out", out.name]
    proc = latflow_cli.spawn(args, tmp_path)
    _wait_for(lambda: WRITER_OPEN.search(proc.stderr_so_far()) or not proc.running(), 120, "the writer to open it")
    _wait_for(lambda: _n_committed(out) >= total // 10 or not proc.running(), 120, "committed rows")
    proc.kill(signal.SIGTERM)
    r = proc.wait(120)
    assert r.returncode == 143, f"expected exit 143 after SIGTERM (the run may have ended first):\n{r}"
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("latflow: terminated (SIGTERM)") and "--resume" in last, r.stderr
    with EnsembleReader(out) as e:
        n = e.n_committed
    assert total // 10 <= n < total
    v = latflow_cli.run(["verify", out.name], tmp_path)
    assert v.returncode == 0, str(v)
    _assert_rows_equal(out, ref, n)
    r = latflow_cli.run(args + ["--resume"], tmp_path)
    assert r.returncode == 0, str(r)
    _assert_rows_equal(out, ref, total)
    assert _row_datasets(out) == _row_datasets(ref)


def test_sigterm_during_training_says_how_to_resume(latflow_cli, make_job, tmp_path):
    from latflow import checkpoint

    steps = 300
    r, model = _signal_training_after_first_checkpoint(latflow_cli, make_job, tmp_path, signal.SIGTERM, steps)
    assert r.returncode == 143, f"expected exit 143 after SIGTERM (training may have ended first):\n{r}"
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("latflow: terminated (SIGTERM)") and "--resume" in last, r.stderr
    assert checkpoint.load(model)["complete"] is False
    r = latflow_cli.run(["train", "job.toml", "--resume"], tmp_path)
    assert r.returncode == 0, str(r)
    state = checkpoint.load(model)
    assert state["complete"] is True and state["step"] == steps
