"""MPI end-to-end tests: real ``mpiexec -n 2`` runs, no mocks.

* training averages gradients over ranks every step (``tests/mpi_scripts/grad_average.py``);
* ``latflow train`` under two ranks writes one checkpoint, ``latflow sample`` one ensemble with
  one independent chain per rank (``markov/chain`` = rank), which verifies and analyses;
* HMC under two ranks: chain ids ``rank * n_chains + b``;
* ``--resume --set sampler.n_samples=B`` under MPI continues bit for bit;
* a single process never imports mpi4py.

Skipped when ``mpiexec`` or mpi4py is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi_launch import assert_same_ensembles

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
]

NP = 2
TIMEOUT = 180  # seconds per launcher call; a hang (a rank waiting for a dead partner) fails instead of blocking
SCRIPTS = Path(__file__).parent / "mpi_scripts"
# environment variables through which a launcher tells a process it is one of several ranks
LAUNCHER_VARS = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "HYDRA_", "SLURM_")

# the theory and lattice every job here runs on
PHI4_4X4 = """\
[theory]
name = "phi4"
m2 = -4.0
lam = 6.975

[lattice]
shape = [4, 4]
"""

FLOW_JOB = (
    PHI4_4X4
    + """
[model]
n_layers = 2
hidden = [4]

[train]
steps = 20
batch_size = 16
lr = 0.002
checkpoint_every = 10
log_every = 10

[sampler]
kind = "flow-mcmc"
n_samples = 50
batch_size = 16
commit_every = 20
log_every = 1000

[output]
path = "flow.h5"
model = "flow.model.pt"

[run]
seed = 31
"""
)

HMC_JOB = (
    PHI4_4X4
    + """
[sampler]
kind = "hmc"
n_samples = 12
thermalization = 2
n_chains = 3
step_size = 0.1
n_steps = 4
n_tune = 10
commit_every = 5
log_every = 1000

[output]
path = "hmc.h5"

[run]
seed = 11
"""
)

ROW_GROUPS = ("fields", "markov", "weights", "observables")


def _env(*, serial: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if serial:
        for key in list(env):
            if key.startswith(LAUNCHER_VARS):
                del env[key]
    return env


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{what} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def mpirun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mpiexec -n 2 args...`` in ``cwd``; fails the test on a non-zero exit status, with the output."""
    cmd = [shutil.which("mpiexec"), "-n", str(NP), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return _check(proc, " ".join(args))


def mpirun_bg(*args: str, cwd: Path) -> subprocess.Popen:
    cmd = [shutil.which("mpiexec"), "-n", str(NP), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(p: subprocess.Popen, what: str) -> None:
    out, err = p.communicate(timeout=TIMEOUT)
    _check(subprocess.CompletedProcess(p.args, p.returncode, out, err), what)


def latflow_cli(*argv: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the ``latflow`` command in this (single) process; returns (status, stdout)."""
    from latflow.jobs import cli

    capsys.readouterr()
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().out


def rows(path: Path) -> dict[str, np.ndarray]:
    """Every per-row dataset of an ensemble, rows ``[0, n_committed)``."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n_committed"])
        for group in ROW_GROUPS:
            if group in f:
                for name, ds in f[group].items():
                    out[f"{group}/{name}"] = ds[:n]
        out["n_committed"] = np.array(n)
    return out


def by_chain(r: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Row indices of each chain, in file order."""
    chain = r["markov/chain"]
    return {int(c): np.flatnonzero(chain == c) for c in np.unique(chain)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``job.toml`` and the flow trained by ``mpiexec -n 2 latflow train``."""
    d = tmp_path_factory.mktemp("mpi_flow")
    (d / "job.toml").write_text(FLOW_JOB)
    mpirun("latflow", "train", "job.toml", cwd=d)
    return d


def test_gradients_are_averaged_over_ranks(tmp_path: Path) -> None:
    proc = subprocess.run(
        [shutil.which("mpiexec"), "-n", str(NP), sys.executable, str(SCRIPTS / "grad_average.py")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _check(proc, "grad_average.py")
    for rank in range(NP):
        assert f"GRAD_AVERAGE_OK rank={rank} size={NP}" in proc.stdout, proc.stdout


def test_train_then_sample_one_chain_per_rank(trained: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    d = trained
    # one checkpoint, written by rank 0 with every rank's training stream gathered into it
    assert [p.name for p in d.glob("*.pt")] == ["flow.model.pt"]
    assert not list(d.glob(".*.tmp")), "a temporary checkpoint was left behind"
    ckpt = torch.load(d / "flow.model.pt", weights_only=True)
    assert ckpt["complete"] is True and ckpt["step"] == 20
    gens = ckpt["generators"]
    assert len(gens) == NP and not torch.equal(gens[0], gens[1]), "ranks must train on independent streams"

    mpirun("latflow", "sample", "job.toml", cwd=d)
    assert [p.name for p in d.glob("*.pt")] == ["flow.model.pt"]
    n_samples = 50
    r = rows(d / "flow.h5")
    assert int(r["n_committed"]) == NP * n_samples
    chains = by_chain(r)
    assert set(chains) == set(range(NP))
    for c, idx in chains.items():
        assert len(idx) == n_samples
        # the default burn-in of flow-MCMC is one proposal batch (16 steps), counted in markov/step
        np.testing.assert_array_equal(r["markov/step"][idx], np.arange(16, 16 + n_samples), err_msg=f"chain {c}")
    phi = r["fields/phi"]
    assert phi.shape == (NP * n_samples, 4, 4)
    a, b = (phi[chains[c]] for c in range(NP))
    assert not np.any(np.all(a == b, axis=(1, 2))), "chains share configurations: streams are not independent"
    assert not np.array_equal(r["weights/log_p"][chains[0]], r["weights/log_p"][chains[1]])

    rc, out = latflow_cli("verify", str(d / "flow.h5"), capsys=capsys)
    assert rc == 0 and out.startswith("OK "), out
    rc, out = latflow_cli("analyze", "--json", str(d / "flow.h5"), capsys=capsys)
    assert rc == 0
    table = json.loads(out)
    assert table["magnetization"]["n"] == NP * n_samples
    assert np.isfinite(table["magnetization"]["mean"]) and table["magnetization"]["err"] > 0
    from latflow.jobs import runner

    assert runner.analyze(d / "flow.h5")["n_chains"] == NP  # the two chains are analysed as replicas


def test_hmc_chain_ids_per_rank(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(HMC_JOB)
    mpirun("latflow", "sample", "job.toml", cwd=tmp_path)
    n_samples, n_chains, thermalization = 12, 3, 2
    r = rows(tmp_path / "hmc.h5")
    assert int(r["n_committed"]) == NP * n_chains * n_samples
    chains = by_chain(r)
    # rank r owns chains r * n_chains + b, b < n_chains: all distinct, n_chains per rank
    assert sorted(chains) == [rank * n_chains + b for rank in range(NP) for b in range(n_chains)]
    for c, idx in chains.items():
        assert len(idx) == n_samples
        steps = r["markov/step"][idx]
        np.testing.assert_array_equal(
            steps, np.arange(thermalization, thermalization + n_samples), err_msg=f"chain {c}"
        )
    phi = r["fields/phi"]
    last = np.stack([phi[idx[-1]] for idx in chains.values()])
    assert len({x.tobytes() for x in last}) == NP * n_chains, "chains ended in the same configuration"
    # the ranks' first chains start from different configurations (independent streams)
    assert not np.array_equal(phi[chains[0]], phi[chains[n_chains]])


@pytest.mark.slow  # the default run resumes a 2-rank HMC ensemble (test_pipelined_hmc_equals_ranks_alone_and_resumes)
def test_resume_under_mpi_is_bit_identical(trained: Path) -> None:
    d = trained
    # A is a multiple of commit_every (20), so both runs draw the same blocks
    a, b = 40, 70
    short = mpirun_bg("latflow", "sample", "job.toml", "--out", "resumed.h5", "--set", f"sampler.n_samples={a}", cwd=d)
    straight = mpirun_bg(
        "latflow", "sample", "job.toml", "--out", "straight.h5", "--set", f"sampler.n_samples={b}", cwd=d
    )
    wait(short, "first part")
    wait(straight, "straight run")
    assert int(rows(d / "resumed.h5")["n_committed"]) == NP * a
    mpirun("latflow", "sample", "job.toml", "--out", "resumed.h5", "--resume", "--set", f"sampler.n_samples={b}", cwd=d)

    resumed, ref = rows(d / "resumed.h5"), rows(d / "straight.h5")
    assert int(ref["n_committed"]) == NP * b
    assert resumed.keys() == ref.keys()
    for key in ref:
        assert resumed[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(resumed[key], ref[key], err_msg=key)
    with h5py.File(d / "resumed.h5", "r") as f1, h5py.File(d / "straight.h5", "r") as f2:
        assert f1["fields/phi"].attrs["sha256"] == f2["fields/phi"].attrs["sha256"]


def test_failure_on_one_rank_ends_the_job(tmp_path: Path) -> None:
    """Rank 0 fails while rank 1 waits for it in a collective: the job must stop, not hang."""
    (tmp_path / "job.toml").write_text(HMC_JOB)
    cmd = [
        shutil.which("mpiexec"),
        "-n",
        str(NP),
        sys.executable,
        str(SCRIPTS / "fail_on_root.py"),
        "sample",
        "job.toml",
    ]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("a failure on rank 0 left the other rank waiting forever")
    assert proc.returncode != 0
    assert "[rank 0]" in proc.stderr and "No space left on device (injected" in proc.stderr, proc.stderr


def test_single_process_never_imports_mpi4py(tmp_path: Path) -> None:
    job = FLOW_JOB.replace("steps = 20", "steps = 3").replace("n_samples = 50", "n_samples = 10")
    (tmp_path / "job.toml").write_text(job)
    code = textwrap.dedent(
        """
        import sys
        import latflow.jobs.cli as c
        rc = c.main(["run", "job.toml"])
        assert rc == 0, rc
        from latflow.mpi import get_comm
        assert get_comm().size == 1
        print("MPI4PY_IMPORTED", "mpi4py" in sys.modules)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(serial=True),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _check(proc, "single-process run")
    assert "MPI4PY_IMPORTED False" in proc.stdout, proc.stdout
    assert (tmp_path / "flow.h5").exists() and (tmp_path / "flow.model.pt").exists()


def test_run_samples_every_chain_with_the_finished_model(tmp_path: Path) -> None:
    """`mpiexec -n 2 latflow run`: rank 1 used to start sampling while rank 0 was still writing the
    final checkpoint, and sampled with an unfinished model. Every chain must come from the finished
    model that `model_sha256` records: its stored log q(x) is that model's density at x."""
    import torch

    from latflow.flows import model_sha256
    from latflow.jobs import runner
    from latflow.jobs.config import load_job

    # checkpoints every 5 steps: an unfinished checkpoint is on disk for most of the training
    job = FLOW_JOB.replace("checkpoint_every = 10", "checkpoint_every = 5").replace("steps = 20", "steps = 40")
    (tmp_path / "job.toml").write_text(job)
    proc = mpirun("latflow", "run", "job.toml", "--out", "m.h5", "--set", "output.model=m.model.pt", cwd=tmp_path)
    assert "unfinished training" not in proc.stderr, proc.stderr
    ckpt = torch.load(tmp_path / "m.model.pt", weights_only=True)
    assert ckpt["complete"] is True and ckpt["step"] == 40

    cfg = load_job(tmp_path / "job.toml", ["output.model=" + str(tmp_path / "m.model.pt")], out=str(tmp_path / "m.h5"))
    model = runner.load_model(cfg, torch.device("cpu"))
    r = rows(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert f.attrs["model_sha256"] == model_sha256(model)
    with torch.no_grad():
        log_q = model.log_prob(torch.from_numpy(r["fields/phi"])).numpy()
    for c, idx in by_chain(r).items():
        np.testing.assert_allclose(r["weights/log_q"][idx], log_q[idx], rtol=0, atol=1e-9, err_msg=f"chain {c}")


SMC_JOB = """
[theory]
name = "u1"
beta = 1.0
[lattice]
shape = [4, 4]
[sampler]
kind = "smc"
n_samples = 8
commit_every = 2
n_particles = 16
path = "coupling"
n_transitions = 5
step_size = 0.3
n_steps = 3
[output]
path = "smc.h5"
[run]
seed = 5
"""


def test_smc_runs_are_spread_over_ranks(tmp_path: Path) -> None:
    """``mpiexec -n 2 latflow sample`` with an annealing kind: each rank runs its own independent populations
    (its own stream); rank 0 writes them as runs with distinct, consecutive ids, and resumes bit for bit."""
    (tmp_path / "job.toml").write_text(SMC_JOB)
    mpirun("latflow", "sample", "job.toml", "--set", "sampler.n_samples=4", cwd=tmp_path)
    mpirun("latflow", "sample", "job.toml", "--resume", cwd=tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "job.toml").write_text(SMC_JOB)
    mpirun("latflow", "sample", "job.toml", cwd=tmp_path / "b")
    import h5py

    with h5py.File(tmp_path / "smc.h5", "r") as fa, h5py.File(tmp_path / "b" / "smc.h5", "r") as fb:
        np.testing.assert_array_equal(fa["annealing/chain"][:], np.arange(8))
        np.testing.assert_array_equal(fa["markov/chain"][:], np.repeat(np.arange(8), 16))
        for key in ("fields/links", "annealing/log_z", "weights/log_w"):
            np.testing.assert_array_equal(fa[key][:], fb[key][:], err_msg=key)
        # runs of rank 0 (ids 0, 1) and rank 1 (ids 2, 3) of one pass differ
        links = fa["fields/links"][:].reshape(8, 16, -1)
        assert not np.array_equal(links[0], links[2])
    subprocess.run([sys.executable, "-m", "latflow.jobs.cli", "verify", "smc.h5"], cwd=tmp_path, check=True, env=_env())


# --- rank 0 receives the other ranks' blocks while it writes (latflow.mpi_blocks.BlockPipe) ---------------------


def chain_rows(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every committed row of an ensemble, chain by chain in Markov order; ``fields/*`` are the chain's stored
    configurations (with ``save_every > 1`` those of ``fields/row``), ``fields/step`` their Markov steps."""
    r = rows(path)
    with h5py.File(path, "r") as f:
        stored = f["fields/row"][:] if "row" in f["fields"] else np.arange(int(r["n_committed"]))
    stored = stored[stored < int(r["n_committed"])]
    out: dict[int, dict[str, np.ndarray]] = {}
    for c, idx in by_chain(r).items():
        mine = np.flatnonzero(r["markov/chain"][stored] == c)
        chain = {k: v[idx] for k, v in r.items() if k != "n_committed" and not k.startswith("fields/")}
        chain.update({k: v[mine] for k, v in r.items() if k.startswith("fields/") and k != "fields/row"})
        chain["fields/step"] = r["markov/step"][stored[mine]]
        out[c] = chain
    return out


def assert_same_chains(a: dict[int, dict[str, np.ndarray]], b: dict[int, dict[str, np.ndarray]]) -> None:
    assert sorted(a) == sorted(b)
    for c in a:
        assert a[c].keys() == b[c].keys(), c
        for key in a[c]:
            assert a[c][key].dtype == b[c][key].dtype, (c, key)
            np.testing.assert_array_equal(a[c][key], b[c][key], err_msg=f"chain {c}: {key}")


def test_pipelined_hmc_equals_ranks_alone_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two ranks, six commits of two steps, configurations kept every third step (so the file's
    ``fields/row`` offsets of both ranks are exercised, with blocks that do not align with ``save_every``):

    * the ensemble verifies, and its rows are chain by chain, bit for bit, those of each rank sampled alone
      in a single process (``mpi_scripts/rank_by_rank.py``): rank 0 wrote every block of every rank,
      in Markov order, whatever the order the blocks arrived in;
    * each commit holds one block of each rank, rank after rank (ENSEMBLE_FORMAT.md);
    * a run stopped after three commits and resumed equals the uninterrupted run bit for bit.
    """
    (tmp_path / "job.toml").write_text(HMC_JOB)
    sets = ["sampler.tune=false", "sampler.commit_every=2", "output.save_every=3"]
    flags = [x for s in sets for x in ("--set", s)]
    n_samples, n_chains = 12, 3
    straight = mpirun_bg("latflow", "sample", "job.toml", "--out", "straight.h5", *flags, cwd=tmp_path)
    short = mpirun_bg(
        "latflow", "sample", "job.toml", "--out", "resumed.h5", *flags, "--set", "sampler.n_samples=6", cwd=tmp_path
    )
    alone = subprocess.run(
        [sys.executable, str(SCRIPTS / "rank_by_rank.py"), "job.toml", str(NP), *flags],
        cwd=tmp_path,
        env=_env(serial=True),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _check(alone, "rank_by_rank.py")
    wait(straight, "straight run")
    wait(short, "first part")
    mpirun("latflow", "sample", "job.toml", "--out", "resumed.h5", "--resume", *flags, cwd=tmp_path)

    for name in ("straight.h5", "resumed.h5"):
        rc, out = latflow_cli("verify", str(tmp_path / name), capsys=capsys)
        assert rc == 0 and out.startswith("OK "), out
    ref = rows(tmp_path / "straight.h5")
    assert int(ref["n_committed"]) == NP * n_chains * n_samples
    # commit i: steps 2i, 2i+1 of rank 0's chains (step-major), then the same steps of rank 1's
    chain = ref["markov/chain"].reshape(n_samples // 2, NP, 2, n_chains)
    np.testing.assert_array_equal(
        chain, np.broadcast_to(np.arange(NP * n_chains).reshape(NP, 1, n_chains), chain.shape)
    )

    mpi = chain_rows(tmp_path / "straight.h5")
    alone_chains: dict[int, dict[str, np.ndarray]] = {}
    for rank in range(NP):
        mine = chain_rows(tmp_path / f"rank{rank}.h5")
        assert sorted(mine) == [rank * n_chains + b for b in range(n_chains)]
        alone_chains.update(mine)
    assert_same_chains(mpi, alone_chains)
    for c, data in mpi.items():  # configurations of steps 2, 5, 8, 11 of each chain (thermalization 2)
        np.testing.assert_array_equal(data["fields/step"], 2 + np.arange(2, n_samples, 3), err_msg=f"chain {c}")

    resumed = rows(tmp_path / "resumed.h5")
    assert resumed.keys() == ref.keys()
    for key in ref:
        assert resumed[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(resumed[key], ref[key], err_msg=key)
    with h5py.File(tmp_path / "resumed.h5", "r") as f1, h5py.File(tmp_path / "straight.h5", "r") as f2:
        for key in ("fields/phi", "fields/row"):
            assert f1[key].attrs["sha256"] == f2[key].attrs["sha256"], key


def _descendants_running_latflow(pid: int) -> list[int]:
    """PIDs of the processes below ``pid`` whose command is ``latflow`` (a launcher's ranks), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                argv = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"latflow") for part in argv[:2]):
                found.append(child)
    return found


def _rank0_pid(launcher: subprocess.Popen, ens: Path) -> int:
    """The PID of rank 0: of the launcher's two ranks, the one that holds ``ens`` open."""
    from conftest import wait_for

    def writer() -> int | None:
        for pid in _descendants_running_latflow(launcher.pid):
            try:
                fds = list((Path("/proc") / str(pid) / "fd").iterdir())
                if any(os.path.realpath(fd) == str(ens.resolve()) for fd in fds):
                    return pid
            except OSError:
                continue
        return None

    return wait_for(lambda: writer() or launcher.poll() is not None, 60, f"rank 0 to open {ens.name}")


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to find rank 0")
def test_rank0_killed_while_ranks_run_ahead_leaves_a_resumable_ensemble(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """SIGKILL of rank 0 after a few commits, while the other rank may have sent blocks it never received:
    the file verifies (INCOMPLETE) with whole blocks of both ranks, and ``--resume`` ends with the ensemble of an
    uninterrupted 2-rank run, bit for bit."""
    from conftest import wait_for

    job = HMC_JOB.replace("n_samples = 12", "n_samples = 100000").replace("commit_every = 5", "commit_every = 2")
    (tmp_path / "job.toml").write_text(job)
    ens = tmp_path / "hmc.h5"
    flags = ["--set", "sampler.tune=false"]
    rows_per_step = NP * 3
    launcher = mpirun_bg("latflow", "sample", "job.toml", *flags, cwd=tmp_path)
    try:
        pid = _rank0_pid(launcher, ens)
        assert launcher.poll() is None, launcher.communicate()

        def committed() -> int:
            try:
                with h5py.File(ens, "r", locking=False) as f:
                    return int(f.attrs["n_committed"])
            except Exception:  # noqa: BLE001 - caught mid-flush: try again
                return 0

        wait_for(lambda: committed() >= 3 * 2 * rows_per_step or launcher.poll() is not None, 120, "three commits")
        os.kill(pid, 9)
        launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    rc, out = latflow_cli("verify", str(ens), capsys=capsys)
    assert rc == 0 and out.startswith("INCOMPLETE "), out
    n = int(rows(ens)["n_committed"])
    assert n >= 3 * 2 * rows_per_step and n % (2 * rows_per_step) == 0, n  # whole blocks of both ranks
    steps = n // rows_per_step + 6
    more = ["--set", f"sampler.n_samples={steps}"]
    resume = mpirun_bg("latflow", "sample", "job.toml", "--resume", *flags, *more, cwd=tmp_path)
    straight = mpirun_bg("latflow", "sample", "job.toml", "--out", "ref.h5", *flags, *more, cwd=tmp_path)
    wait(resume, "resumed run")
    wait(straight, "uninterrupted run")
    assert int(rows(tmp_path / "ref.h5")["n_committed"]) == steps * rows_per_step
    assert_same_ensembles(ens, tmp_path / "ref.h5", "phi")


def test_block_pipe_delivers_every_block_in_order_with_three_ranks(tmp_path: Path) -> None:
    """Three ranks (more than this machine's cores may be), blocks small and large, random delays: rank 0
    gets block i of every rank, in rank order, bit for bit, and every rank finishes (``mpi_scripts/block_pipe.py``)."""
    n = 3
    proc = subprocess.run(
        [shutil.which("mpiexec"), "-n", str(n), sys.executable, str(SCRIPTS / "block_pipe.py")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _check(proc, "block_pipe.py")
    assert f"BLOCK_PIPE_OK size={n}" in proc.stdout, proc.stdout
    for rank in range(n):
        assert f"BLOCK_PIPE_DONE rank={rank}" in proc.stdout, proc.stdout


@pytest.mark.slow  # the HMC version runs by default; this one repeats it for flow-MCMC
def test_pipelined_flow_mcmc_equals_ranks_alone(trained: Path) -> None:
    """Flow-MCMC, one chain per rank (``markov/chain`` = rank), commits of 7 steps: the 2-rank ensemble holds,
    chain by chain and bit for bit, the rows of each rank sampled alone with its own stream."""
    d = trained
    flags = ["--set", "sampler.commit_every=7"]  # 50 steps: 7 full commits and a short last one
    mpirun("latflow", "sample", "job.toml", "--out", "pipe.h5", *flags, cwd=d)
    alone = subprocess.run(
        [sys.executable, str(SCRIPTS / "rank_by_rank.py"), "job.toml", str(NP), *flags],
        cwd=d,
        env=_env(serial=True),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _check(alone, "rank_by_rank.py")
    mpi = chain_rows(d / "pipe.h5")
    assert sorted(mpi) == list(range(NP)) and all(len(c["markov/step"]) == 50 for c in mpi.values())
    ranks: dict[int, dict[str, np.ndarray]] = {}
    for rank in range(NP):
        ranks.update(chain_rows(d / f"rank{rank}.h5"))
    assert_same_chains(mpi, ranks)
